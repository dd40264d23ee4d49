"""Text encodings computed once per prompt: they do not depend on the candidate heads, so a search that
generates every prompt hundreds of times encodes it once."""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["PromptCache"]

# What `encode_prompt` returns, by tuple length, as the pipeline call's keyword names.
_OUTPUT_NAMES = {
    2: ("prompt_embeds", "negative_prompt_embeds"),  # StableDiffusionPipeline
    4: ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    3: ("prompt_embeds", "pooled_prompt_embeds", None),  # FluxPipeline (text_ids are rebuilt by the call)
}


class PromptCache:
    """Per-prompt embeddings of a pipeline as batch-1 tensors, and their concatenation for a batch.

    Args:
        pipe: a diffusers text-to-image pipeline with ``encode_prompt`` (SD, SDXL, SD3, FLUX).
        cfg: whether the calls run classifier-free guidance (negative embeddings are needed then).
        negative_prompt: the negative prompt for every call.
    """

    def __init__(self, pipe: Any, cfg: bool, negative_prompt: str | None = None) -> None:
        if not hasattr(pipe, "encode_prompt"):
            raise NotImplementedError(
                f"{type(pipe).__name__} has no encode_prompt(); the head search needs a diffusers text-to-image "
                "pipeline (SD, SDXL, SD3, FLUX)"
            )
        self.pipe = pipe
        self.cfg = cfg
        self.negative_prompt = negative_prompt
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def embeddings(self, prompt: str) -> dict[str, torch.Tensor]:
        """The pipeline-call keywords holding ``prompt``'s encodings (computed on first use)."""
        if prompt not in self._cache:
            self._cache[prompt] = self._encode(prompt)
        return self._cache[prompt]

    def batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Keywords for a pipeline call over ``prompts`` (one row per prompt, repeats allowed)."""
        rows = [self.embeddings(p) for p in prompts]
        return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}

    def _encode(self, prompt: str) -> dict[str, torch.Tensor]:
        accepted = inspect.signature(self.pipe.encode_prompt).parameters
        offered = {
            "prompt": prompt,
            "device": self.pipe._execution_device,
            "num_images_per_prompt": 1,
            "do_classifier_free_guidance": self.cfg,
            "negative_prompt": self.negative_prompt,
        }
        if "prompt_2" in accepted:  # SDXL, SD3, FLUX: the second (and third) encoders get the same prompt
            offered.update(prompt_2=None, prompt_3=None)
        with torch.no_grad():
            outputs = self.pipe.encode_prompt(**{k: v for k, v in offered.items() if k in accepted})
        names = _OUTPUT_NAMES.get(len(outputs))
        if names is None:
            raise NotImplementedError(
                f"{type(self.pipe).__name__}.encode_prompt returned {len(outputs)} values; the head search knows "
                "SD, SDXL, SD3 and FLUX pipelines"
            )
        return {
            name: value
            for name, value in zip(names, outputs, strict=True)
            if name is not None and isinstance(value, torch.Tensor)
        }
