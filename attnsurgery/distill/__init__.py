"""Distil a UNet's self-attention into ConvFusion blocks: frozen teacher, trainable conv blocks.

The student is the same denoiser with every attn1 swapped for a conv block (through the surgery, so the
model is restored afterwards); the teacher is a second module tree over the *same* weight tensors, keeping
its attention, so distilling costs no second copy of the model. Only the blocks train (AdamW, warm-up,
gradient clipping), on ``accelerate`` (one process, or several under ``accelerate launch``).

Everything random in a step (batch order, caption dropout, noise, timesteps) is a pure function of
``(seed, step, process)``, so ``resume`` continues exactly where a checkpoint left off.

Modules: ``config`` (settings), ``data`` (latent folders from prompts, images or shards), ``loss`` (the
three-term objective), ``trainer`` (the optimiser and the step), ``resume`` (checkpoints) and ``run``
(``distill()`` itself); the command line is ``attnsurgery distill`` (``attnsurgery.cli.distill_cmd``).

Example:
    >>> result = distill(pipe, "prompts.txt", "out", DistillConfig(steps=2000))   # doctest: +SKIP
    >>> handle = attnsurgery.apply(pipe, result.plugin)                            # doctest: +SKIP
"""

from .config import DistillConfig
from .run import DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill"]
