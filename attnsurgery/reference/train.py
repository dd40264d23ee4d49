"""Train a reference model from scratch, deterministically from a seed: the U-Net or the DiT topology.

U-Net (``--topology unet``), two stages: (1) the AutoencoderKL learns to reconstruct shapes images (on
random crops, which it sees as whole images because it is convolutional), and its latent scale is
measured; (2) the UNet and the text encoder learn epsilon or velocity prediction on the frozen VAE's
latents of freshly generated captioned scenes (10% empty captions, for classifier-free guidance), with
min-SNR weighting and an EMA of the weights, which is what gets saved.

DiT (``--topology flux``): the FluxPipeline takes the U-Net reference's VAE (frozen; its latent mean and
scale are measured) and CLIP text encoder, and its transformer and both text encoders learn rectified flow
in the same loop (see ``topologies``). Both write fp16 safetensors, ``config.json`` and ``MODEL_CARD.md``.

Training on 2 CPU cores takes hours, so a run can be split: every 100 denoiser steps the full state
(weights, EMA, optimiser, data and noise generators) goes to ``checkpoint.pt``; ``--resume`` continues it
exactly (raising ``--steps`` trains further), and ``--init-from DIR`` starts a new stage from saved weights.

Usage:
    python -m attnsurgery.reference.train --out /tmp/reference --seed 0 --vae-steps 400 --steps 3000
    python -m attnsurgery.reference.train --out /tmp/reference --seed 0 --vae-steps 400 --steps 9000 --resume
    python -m attnsurgery.reference.train --topology flux --out /tmp/reference-flux --steps 6000 --lr 6e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from tqdm.auto import tqdm

from attnsurgery.reference.eval import CARD_SUITE, TABLE_HEADER, evaluation_rows, pipeline_sampler
from attnsurgery.reference.evaluator import score
from attnsurgery.reference.model import GUIDANCE_SCALE, load_reference_pipeline
from attnsurgery.reference.shapes import HELDOUT_SEED_BASE, OBJECT_SCALES, Scene, heldout_seed, make_scene, render
from attnsurgery.reference.topologies import MIN_SNR_GAMMA, TOPOLOGIES, Topology
from attnsurgery.training import atomic_path, ema_update, setting_changes, warmup_cooldown

#: Training scenes draw 1, 2 or 3 objects with these probabilities (one-object prompts are the gate).
OBJECT_COUNT_PROBS = (0.5, 0.25, 0.25)
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-6
OBJECT_WEIGHT = 5.0
#: The latent scaling factor is 1 / std of the latents of this many batches of fresh images.
SCALE_SAMPLE_BATCHES, SCALE_SAMPLE_SIZE = 4, 32
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_EVERY = 100
CHECKPOINT_VERSION = 2
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Creating this file in the output folder ends the UNet stage early; the weights are still written.
STOP_FILE = "STOP"
#: The VAE stage stops once reconstructions of these held-out probe scenes pass the evaluator.
VAE_PROBE_SCENES = 48
VAE_PROBE_EVERY = 50


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (recorded in the model card)."""

    seed: int = 0
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_target_fidelity: float = 0.97
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    cooldown_steps: int = 600  # the LR falls linearly to 0 over the last cooldown_steps of steps
    ema_decay: float = 0.995
    # v_prediction: the model predicts x0 directly at high noise, where epsilon errors grow ~12x into x0
    prediction_type: str = "v_prediction"  # U-Net only; the DiT always learns rectified flow's velocity
    topology: str = "unet"
    object_scale: str = "fixed"  # a key of shapes.OBJECT_SCALES: the training objects' size range


class SceneStream:
    """Unlimited captioned training images; scene seeds come from a private RNG and stay below the
    held-out range, so evaluation prompts are never trained on."""

    def __init__(self, seed: int, size: int = 64, object_scale: str = "fixed") -> None:
        self.rng = np.random.default_rng(seed)
        self.size = size
        self.object_scale = object_scale

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """``n`` images in [-1, 1], ``[n, 3, size, size]``, and their captions."""
        seeds = self.rng.integers(0, HELDOUT_SEED_BASE, size=n)
        counts = self.rng.choice([1, 2, 3], size=n, p=OBJECT_COUNT_PROBS)
        scenes = [make_scene(int(s), int(c), self.object_scale) for s, c in zip(seeds, counts, strict=True)]
        images = np.stack([render(s, self.size) for s in scenes])
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return tensor, [s.caption for s in scenes]


def _random_crops(images: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    if crop >= images.shape[-1]:
        return images
    out = []
    for image in images:
        y, x = rng.integers(0, images.shape[-1] - crop + 1, size=2)
        out.append(image[:, y : y + crop, x : x + crop])
    return torch.stack(out)


def reconstruction_fidelity(vae: torch.nn.Module, scenes: list[Scene]) -> float:
    """Fraction of ``scenes`` whose VAE round trip the evaluator still reads as the caption."""
    pixels = torch.from_numpy(np.stack([render(s, 64) for s in scenes]))
    images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean([score(p, s.caption).correct for p, s in zip(pixels, scenes, strict=True)]))


def object_weights(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights ``[n, 1, h, w]``: OBJECT_WEIGHT on coloured pixels, 1 on the grey background.

    Objects cover a small part of each image; without this the VAE first learns the background and
    confuses neighbouring hues (red/orange, purple/blue) for a long time.
    """
    saturated = (images.amax(dim=1, keepdim=True) - images.amin(dim=1, keepdim=True)) > 0.2
    return 1.0 + (OBJECT_WEIGHT - 1.0) * saturated.float()


def train_vae(pipe: StableDiffusionPipeline, cfg: TrainConfig, stream: SceneStream) -> list[float]:
    """Fit the AutoencoderKL (object-weighted L1 + MSE, tiny KL) until its round trip keeps held-out
    scenes readable (``cfg.vae_target_fidelity``) or ``cfg.vae_steps`` run out; then set the scaling
    factor to 1 / std(latents)."""
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    probe = [make_scene(heldout_seed(10**9 + i)) for i in range(VAE_PROBE_SCENES)]
    losses: list[float] = []
    fidelity = 0.0
    bar = tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)
    for step in bar:
        images = _random_crops(stream.batch(cfg.vae_batch_size)[0], cfg.vae_crop, stream.rng)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        error = (recon - images).abs() + (recon - images).pow(2)
        loss = (object_weights(images) * error).mean() + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % VAE_PROBE_EVERY == 0:
            fidelity = reconstruction_fidelity(vae.eval(), probe)
            vae.train()
            if fidelity >= cfg.vae_target_fidelity:
                break
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", probe_fidelity=f"{fidelity:.2f}")
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=float(1.0 / _sample_latents(vae, stream).std()))
    bar.write(f"vae: {len(losses)} steps, round-trip fidelity on {len(probe)} held-out scenes {fidelity:.3f}")
    return losses


def _sample_latents(vae: torch.nn.Module, stream: SceneStream) -> torch.Tensor:
    """Latents (distribution modes) of ``SCALE_SAMPLE_BATCHES`` fresh batches, for the latent statistics."""
    with torch.no_grad():
        batches = [stream.batch(SCALE_SAMPLE_SIZE)[0] for _ in range(SCALE_SAMPLE_BATCHES)]
        return torch.cat([vae.encode(images).latent_dist.mode() for images in batches])


def adopt_unet_reference_parts(pipe: DiffusionPipeline, stream: SceneStream) -> None:
    """Give the reference DiT the shipped U-Net reference's VAE and CLIP text encoder (one image space),
    and set the latent shift and scale to the mean and 1 / std of its latents."""
    source = load_reference_pipeline()
    pipe.vae.load_state_dict(source.vae.state_dict())
    pipe.text_encoder.load_state_dict(source.text_encoder.state_dict())
    latents = _sample_latents(pipe.vae, stream)
    pipe.vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))


@dataclass
class DenoiserState:
    """Everything the UNet stage needs to continue exactly where it stopped (saved in ``checkpoint.pt``)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    model: dict | None = None  # trained denoiser + text encoder weights
    ema: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None


def train_denoiser(
    pipe: DiffusionPipeline,
    cfg: TrainConfig,
    stream: SceneStream,
    generator: torch.Generator,
    out: Path,
    max_minutes: float | None,
    state: DenoiserState | None = None,
    save: Callable[[DenoiserState], None] | None = None,
) -> list[float]:
    """Train the topology's denoiser and text encoders on latents; the EMA copies replace the pipeline's
    modules at the end.

    Stops early (the returned history is then shorter) when ``max_minutes`` runs out or a ``STOP`` file
    appears in ``out``. ``state`` continues an interrupted run; ``save`` receives the state every
    ``CHECKPOINT_EVERY`` steps and at the end.
    """
    state = state or DenoiserState()
    topology = TOPOLOGIES[cfg.topology]
    trained = _trained_modules(pipe, topology).train().requires_grad_(True)
    if state.model is not None:
        trained.load_state_dict(state.model)
    ema = copy.deepcopy(trained).eval().requires_grad_(False)
    if state.ema is not None:
        ema.load_state_dict(state.ema)
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, cfg))
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
    objective = topology.objective(pipe, cfg.prediction_type)
    losses = state.losses
    start = time.monotonic()

    def snapshot(step: int) -> DenoiserState:
        return DenoiserState(step, losses, trained.state_dict(), ema.state_dict(), opt.state_dict(), sched.state_dict())

    bar = tqdm(
        range(state.step, cfg.steps), desc=topology.denoiser, dynamic_ncols=True, initial=state.step, total=cfg.steps
    )
    for step in bar:
        images, captions = stream.batch(cfg.batch_size)
        captions = ["" if stream.rng.random() < CAPTION_DROPOUT else c for c in captions]
        loss = objective(pipe, images, captions, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, trained, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        stopping = None
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            stopping = f"--max-minutes {max_minutes} reached"
        elif (out / STOP_FILE).exists():
            stopping = f"{out / STOP_FILE} exists"
        if save is not None and ((step + 1) % CHECKPOINT_EVERY == 0 or stopping or step + 1 == cfg.steps):
            save(snapshot(step + 1))
        if stopping:
            bar.write(f"stopping at step {step + 1}: {stopping}")
            break
    for name, module in ema.items():
        getattr(pipe, name).load_state_dict(module.state_dict())
        getattr(pipe, name).eval().requires_grad_(False)
    return losses


def _trained_modules(pipe: DiffusionPipeline, topology: Topology) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({name: getattr(pipe, name) for name in topology.trained})


def loss_summary(losses: list[float], rows: int = 10) -> list[tuple[int, float]]:
    """(last step, mean loss) over ``rows`` equal spans of the run: the loss curve in a table."""
    if not losses:
        return []
    span = max(1, math.ceil(len(losses) / rows))
    starts = range(0, len(losses), span)
    return [(min(i + span, len(losses)), float(np.mean(losses[i : i + span]))) for i in starts]


def write_model_card(out: Path, record: dict) -> None:
    """MODEL_CARD.md from the training record (``training.json``) and any evaluation results in it."""
    cfg = record["config"]
    topology = TOPOLOGIES[cfg.get("topology", "unet")]
    steps = record.get("total_steps", record["steps_done"])
    if topology.name == "unet":
        title = "# attnsurgery reference model"
        stage_one = (
            f"VAE {record['vae_steps_done']} steps (batch {cfg['vae_batch_size']}, {cfg['vae_crop']} px "
            f"crops, lr {cfg['vae_lr']}); UNet + text encoder {steps} steps"
        )
        objective = f"min-SNR {MIN_SNR_GAMMA}, {cfg.get('prediction_type', 'epsilon')} prediction"
    else:
        title = "# attnsurgery reference DiT"
        stage_one = f"VAE and CLIP from the U-Net reference; transformer + text encoders {steps} steps"
        objective = "rectified flow, logit-normal noise levels shifted as the scheduler shifts 64 px"
    lines = [
        title,
        "",
        topology.description,
        "",
        "## Reproduce",
        "",
        *[f"    {command}" for command in record.get("commands", [record["command"]])],
        "",
        f"Seed {cfg['seed']}; {stage_one} "
        f"(batch {cfg['batch_size']}, lr {cfg['lr']}, warmup {cfg['warmup_steps']}, "
        f"cool-down {cfg.get('cooldown_steps', 0)}, EMA {cfg['ema_decay']}, "
        f"{objective}, {int(CAPTION_DROPOUT * 100)}% empty captions). "
        f"Wall clock {record['minutes']:.1f} min on {record['device']}. Weights stored in fp16.",
        "",
        f"Parameters: {record['parameters']}. VAE scaling factor {record['scaling_factor']:.4f}.",
        "",
        "## Loss curve (mean over spans of steps)",
        "",
        "| stage | up to step | loss |",
        "| --- | ---: | ---: |",
    ]
    for stage in ("vae", topology.denoiser):
        lines += [f"| {stage} | {s} | {v:.4f} |" for s, v in record.get(f"{stage}_loss", [])]
    if record.get("notes"):
        lines += ["", "## Status", "", *record["notes"]]
    rows = record.get("evaluation_rows", {})
    if rows:
        ordered = [rows[label] for label, *_ in CARD_SUITE if label in rows]
        lines += [
            "",
            "## Evaluator numbers (held-out seeds, analytic evaluator)",
            "",
            record["evaluation_setting"],
            "",
            *TABLE_HEADER,
            *ordered,
        ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Warm-up, constant, then the cool-down to 0 (a cool-down can be added to a resumed run, since the
    constant phase before it is the same)."""
    return warmup_cooldown(step, cfg.steps, cfg.warmup_steps, cfg.cooldown_steps)


#: Settings a resumed run may change: nothing before the current step depends on them.
RESUMABLE_CHANGES = ("steps", "cooldown_steps")


def _checkpoint_settings(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share."""
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def _load_checkpoint(out: Path, cfg: TrainConfig) -> dict:
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist; start without --resume")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"--resume: {path} was written by an older trainer and cannot be continued exactly; "
            "use --init-from with the weights it produced"
        )
    changed = [change.name for change in setting_changes(checkpoint["settings"], _checkpoint_settings(cfg))]
    if changed:
        raise ValueError(
            f"--resume: {path} was written with other settings ({changed}); pass the same ones "
            "(only --steps and --cooldown-steps may change)"
        )
    return checkpoint


def _warm_start(pipe: DiffusionPipeline, topology: Topology, init_from: Path) -> tuple[DenoiserState, list[str], int]:
    """The VAE and the denoiser weights of an earlier run; its commands and denoiser steps (for the card)."""
    earlier = topology.load(init_from)
    pipe.vae.load_state_dict(earlier.vae.state_dict())
    latent_keys = ("scaling_factor", "shift_factor")
    pipe.vae.register_to_config(**{k: earlier.vae.config[k] for k in latent_keys if k in earlier.vae.config})
    weights = _trained_modules(earlier, topology).state_dict()
    record_file = init_from / "training.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    commands = record.get("commands", [record["command"]] if "command" in record else [])
    return DenoiserState(model=weights, ema=weights), commands, record.get("total_steps", record.get("steps_done", 0))


def train(
    cfg: TrainConfig,
    out: Path,
    max_minutes: float | None = None,
    resume: bool = False,
    init_from: Path | None = None,
) -> DiffusionPipeline:
    """Run the topology's stages and write the weights, ``training.json`` and the model card into ``out``.

    Args:
        cfg: the training settings; equal settings give equal weights on the same machine.
        out: output folder (created).
        max_minutes: stop the UNet stage early after this many minutes (the card records the steps done).
        resume: continue exactly from ``out``'s checkpoint (written every ``CHECKPOINT_EVERY`` steps): the
            weights equal those of an uninterrupted run; ``cfg.steps`` may be raised to train longer.
        init_from: a folder of trained reference weights to start the UNet stage from (its VAE is kept;
            the optimiser starts afresh): a second stage whose command the card lists after the first's.

    Example:
        >>> train(TrainConfig(vae_steps=2, steps=2), Path("/tmp/ref"))  # doctest: +SKIP
    """
    if resume and init_from is not None:
        raise ValueError("give --resume (continue this folder's run) or --init-from (start from other weights)")
    out.mkdir(parents=True, exist_ok=True)
    (out / STOP_FILE).unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)  # module initialisation only; data and noise use private generators
    begin = time.monotonic()
    if not 0 <= cfg.cooldown_steps <= cfg.steps:
        raise ValueError(f"cooldown_steps must be between 0 and steps ({cfg.steps}), got {cfg.cooldown_steps}")
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {cfg.prediction_type!r} is not one of {PREDICTION_TYPES}")
    if cfg.topology not in TOPOLOGIES:
        raise ValueError(f"topology {cfg.topology!r} is not one of {tuple(TOPOLOGIES)}")
    topology = TOPOLOGIES[cfg.topology]
    pipe = topology.build()
    if topology.name == "unet":
        pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)
    stream = SceneStream(cfg.seed, object_scale=cfg.object_scale)
    generator = torch.Generator().manual_seed(cfg.seed)
    command = "python -m attnsurgery.reference.train " + " ".join(sys.argv[1:])
    earlier_steps, minutes_before = 0, 0.0
    if resume:
        checkpoint = _load_checkpoint(out, cfg)
        pipe.vae.load_state_dict(checkpoint["vae"])
        pipe.vae.register_to_config(scaling_factor=checkpoint["scaling_factor"])
        if "shift_factor" in checkpoint:
            pipe.vae.register_to_config(shift_factor=checkpoint["shift_factor"])
        stream.rng.bit_generator.state = checkpoint["stream_rng"]
        generator.set_state(checkpoint["generator"])
        vae_losses, state = checkpoint["vae_losses"], DenoiserState(**checkpoint["denoiser"])
        commands, earlier_steps = [*checkpoint["commands"], command], checkpoint["earlier_steps"]
        minutes_before = checkpoint["minutes"]
    elif init_from is not None:
        state, commands, earlier_steps = _warm_start(pipe, topology, init_from)
        commands, vae_losses = [*commands, command], []
    elif topology.name == "flux":
        adopt_unet_reference_parts(pipe, stream)
        vae_losses, state, commands = [], DenoiserState(), [command]
    else:
        vae_losses, state, commands = train_vae(pipe, cfg, stream), DenoiserState(), [command]

    def save(current: DenoiserState) -> None:
        checkpoint = {
            "version": CHECKPOINT_VERSION,
            "settings": _checkpoint_settings(cfg),
            "commands": commands,
            "earlier_steps": earlier_steps,
            "vae": pipe.vae.state_dict(),
            "scaling_factor": float(pipe.vae.config.scaling_factor),
            "vae_losses": vae_losses,
            "shift_factor": pipe.vae.config.get("shift_factor"),
            "stream_rng": stream.rng.bit_generator.state,
            "generator": generator.get_state(),
            "denoiser": vars(current),
            "minutes": minutes_before + (time.monotonic() - begin) / 60,
        }
        with atomic_path(out / CHECKPOINT_FILE) as tmp:
            torch.save(checkpoint, tmp)

    if not resume:
        save(state)
    denoiser_losses = train_denoiser(pipe, cfg, stream, generator, out, max_minutes, state, save)
    topology.save(pipe, out)
    record = {
        "command": commands[-1],
        "commands": commands,
        "config": asdict(cfg),
        "vae_steps_done": len(vae_losses),
        "steps_done": len(denoiser_losses),
        "total_steps": earlier_steps + len(denoiser_losses),
        "minutes": minutes_before + (time.monotonic() - begin) / 60,
        "device": f"CPU, {torch.get_num_threads()} threads",
        "parameters": ", ".join(
            f"{n} {sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e6:.2f}M"
            for n in (*topology.trained, "vae")
        ),
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "vae_loss": loss_summary(vae_losses),
        f"{topology.denoiser}_loss": loss_summary(denoiser_losses),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(out, record)
    return pipe


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder for weights and model card")
    parser.add_argument(
        "--topology",
        choices=tuple(TOPOLOGIES),
        default=defaults.topology,
        help="unet: the SD1.x-topology reference; flux: the reference DiT (FLUX.1 topology)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="denoiser + text encoder steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument(
        "--cooldown-steps",
        type=int,
        default=None,
        help="let the LR fall linearly to 0 over the last N steps (default: the last fifth; "
        "may be changed on --resume)",
    )
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=defaults.prediction_type)
    parser.add_argument(
        "--object-scale",
        choices=tuple(OBJECT_SCALES),
        default=defaults.object_scale,
        help="fixed: objects S/5..S/3 (the spec); multi: lone objects up to 0.6 S (draws one object at any size)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop the UNet stage after this long")
    parser.add_argument(
        "--eval", action="store_true", help="evaluate after training and put the evaluator numbers into the model card"
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate the weights already in --out")
    parser.add_argument(
        "--resume", action="store_true", help="continue --out's run exactly from its checkpoint (--steps may be raised)"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start the UNet stage from the weights of an earlier run (a second stage)",
    )
    parser.add_argument("--cfg", type=float, default=GUIDANCE_SCALE, help="guidance scale used by the evaluation")
    parser.add_argument(
        "--eval-pairs",
        type=int,
        nargs=len(CARD_SUITE),
        default=None,
        help=f"pairs per evaluation row ({', '.join(r[0] for r in CARD_SUITE)}); 0 skips",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        evaluate_into_card(args.out, args.cfg, counts=args.eval_pairs)
        return
    cooldown = args.steps // 5 if args.cooldown_steps is None else args.cooldown_steps
    cfg = TrainConfig(
        seed=args.seed,
        vae_steps=args.vae_steps,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        cooldown_steps=cooldown,
        prediction_type=args.prediction_type,
        topology=args.topology,
        object_scale=args.object_scale,
    )
    train(cfg, args.out, args.max_minutes, resume=args.resume, init_from=args.init_from)
    if args.eval:
        evaluate_into_card(args.out, args.cfg, counts=args.eval_pairs)


def evaluate_into_card(
    out: Path, guidance_scale: float = GUIDANCE_SCALE, steps: int = 20, counts: list[int] | None = None
) -> None:
    """Evaluate the weights in ``out`` on held-out pairs and merge the rows into its model card.

    Args:
        out: a folder written by ``train``.
        guidance_scale: classifier-free guidance scale.
        steps: sampling steps per image.
        counts: pairs per ``CARD_SUITE`` row (0 skips a row, keeping any earlier result for it).
    """
    record = json.loads((out / "training.json").read_text())
    pipe = TOPOLOGIES[record["config"].get("topology", "unet")].load(out)
    pipe.set_progress_bar_config(disable=True)
    rows = evaluation_rows(pipeline_sampler(pipe, steps, guidance_scale), counts)
    record = json.loads((out / "training.json").read_text())  # re-read: other evaluations may have landed
    record["evaluation_setting"] = (
        f"{type(pipe.scheduler).__name__}, {steps} steps, guidance scale {guidance_scale}; "
        "held-out seeds (never trained on)."
    )
    record["evaluation_rows"] = {**record.get("evaluation_rows", {}), **rows}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(out, record)
    print("\n".join([*TABLE_HEADER, *rows.values()]))


if __name__ == "__main__":
    main()
