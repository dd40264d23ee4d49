"""Time and peak memory of one denoising step with perturbation guidance.

Compares, per model, in one run:
  plain CFG            the denoiser on [uncond, cond] (batch 2)
  diffusers PAG        diffusers' PAG processors on the same layers, batch [uncond, cond, cond] (what its
                       PAG pipelines run every step)
  ours layer           PerturbedAttention(layers=...) batched
  ours heads batched   half of the heads of the same layers, batched
  ours heads sequential  the same heads, one extra forward for the perturbed rows

Models: the tiny test U-Net and MMDiT, a real-size SD1.5 U-Net and an SD3-medium-shaped transformer with a
few blocks (random weights: only shapes matter for cost). Peak memory is the CUDA allocator's peak on a
GPU; on the CPU it is the peak of glibc's heap in use (mallinfo2) sampled after every ATen op, relative to
the start of the step. Goals (issue): head level <= 2% over layer level; sequential peak <= plain CFG.

Usage (from the repository root):
    python benchmarks/bench_perturbation.py [--models tiny-sd15,tiny-sd3,sd15,sd3-medium] [--repeats 2]
        [--threads 1]
On a CPU shared with other jobs, one thread is far faster than two (OpenMP threads spin while waiting).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0, PAGCFGJointAttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

import attnsurgery as surg
from attnsurgery.testing import tiny


# ------------------------------------------------------------------------------------------ memory
class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use() -> Callable[[], int]:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd  # small-block bytes + mmapped (large tensor) bytes

    return in_use


class _HeapPeak(TorchDispatchMode):
    """Peak heap bytes in use, sampled after every ATen op."""

    def __init__(self, in_use: Callable[[], int]) -> None:
        super().__init__()
        self.in_use = in_use
        self.base = in_use()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.base)
        return out


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak memory of one call of `step` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _HeapPeak(_heap_in_use()) as mode:
        step()
    return mode.peak


def seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `repeats` calls (run after the memory probe, which warms up)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ models
@dataclass
class Case:
    name: str
    denoiser: torch.nn.Module
    inputs: dict[str, torch.Tensor]  # a CFG batch of 2 rows
    layers: str
    pag_processor: object
    note: str


def _init_fast(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights without the slow default initialisers (cost does not depend on the values)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.eval().requires_grad_(False)


def _build(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        model = factory()
    return _init_fast(model.to_empty(device="cpu"))


def _unet_inputs(unet: UNet2DConditionModel, latent: int, text: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, unet.config.in_channels, latent, latent, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(2, text, unet.config.cross_attention_dim, generator=g),
    }


def _sd3_inputs(model: SD3Transformer2DModel, latent: int, text: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    config = model.config
    return {
        "hidden_states": torch.randn(2, config.in_channels, latent, latent, generator=g),
        "timestep": torch.full((2,), 500.0),
        "encoder_hidden_states": torch.randn(2, text, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=g),
    }


def build_case(name: str) -> Case:
    if name == "tiny-sd15":
        unet = tiny.tiny_sd15().unet
        return Case(
            name,
            unet,
            _unet_inputs(unet, 32, 77),
            "mid",
            PAGCFGIdentitySelfAttnProcessor2_0(),
            "tiny SD1.5 U-Net, 256 px",
        )
    if name == "tiny-sd3":
        model = tiny.tiny_sd3(num_layers=4).transformer
        return Case(
            name,
            model,
            _sd3_inputs(model, 32, 16 + 77),
            "transformer_blocks.1",
            PAGCFGJointAttnProcessor2_0(),
            "tiny SD3 MMDiT (4 blocks), 256 px",
        )
    if name == "sd15":
        unet = _build(lambda: UNet2DConditionModel(cross_attention_dim=768, sample_size=64))
        return Case(
            name,
            unet,
            _unet_inputs(unet, 32, 77),
            "mid",
            PAGCFGIdentitySelfAttnProcessor2_0(),
            "SD1.5 U-Net (860M, random), 256 px",
        )
    if name == "sd3-medium":
        model = _build(
            lambda: SD3Transformer2DModel(
                sample_size=128,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=3,
                attention_head_dim=64,
                num_attention_heads=24,
                joint_attention_dim=4096,
                caption_projection_dim=1536,
                pooled_projection_dim=2048,
                pos_embed_max_size=192,
            )
        )
        return Case(
            name,
            model,
            _sd3_inputs(model, 32, 77 + 256),
            "transformer_blocks.1",
            PAGCFGJointAttnProcessor2_0(),
            "SD3-medium blocks (3 of 24, random), 256 px, 333 text tokens",
        )
    raise ValueError(f"unknown model {name!r}; use tiny-sd15, tiny-sd3, sd15 or sd3-medium")


# ------------------------------------------------------------------------------------------ configs
def _call(case: Case, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    def step() -> object:
        with torch.inference_mode():
            return case.denoiser(**inputs, return_dict=False)[0]

    return step


def _pag_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[uncond, cond] -> [uncond, cond, cond], as diffusers' PAG pipelines batch it."""
    return {k: torch.cat([v, v[1:]]) if v.ndim and v.shape[0] == 2 else v for k, v in inputs.items()}


def _half_heads(case: Case, model_info: surg.ModelInfo) -> list[str]:
    layers = model_info.select(case.layers, kinds=("self", "joint", "single"))
    return [f"{layer.path}:{h}" for layer in layers for h in range(0, layer.heads, 2)]


def measure(case: Case, repeats: int, device: torch.device) -> list[tuple[str, float, int]]:
    """(config, seconds per step, peak bytes) for every configuration."""
    case.denoiser.to(device)
    inputs = {k: v.to(device) for k, v in case.inputs.items()}
    # Stand-in pipeline: the guidance wrapper reads the CFG flag from it, as from a diffusers pipeline.
    pipeline = types.SimpleNamespace(do_classifier_free_guidance=True, scheduler=None, vae_scale_factor=8)
    setattr(pipeline, "unet" if isinstance(case.denoiser, UNet2DConditionModel) else "transformer", case.denoiser)
    info = surg.describe(case.denoiser)
    heads = _half_heads(case, info)
    _call(case, inputs)()  # first call of the model: one-time allocations stay out of every row
    configs: list[tuple[str, Callable[[], object]]] = [
        ("plain CFG", lambda: None),
        ("diffusers PAG", lambda: None),
        ("ours layer", lambda: surg.apply(pipeline, surg.PerturbedAttention(layers=case.layers))),
        ("ours heads batched", lambda: surg.apply(pipeline, surg.PerturbedAttention(heads=heads))),
        (
            "ours heads sequential",
            lambda: surg.apply(pipeline, surg.PerturbedAttention(heads=heads, mode="sequential")),
        ),
    ]
    rows = []
    for label, setup in tqdm(configs, desc=case.name, leave=False):
        step_inputs = _pag_inputs(inputs) if label == "diffusers PAG" else inputs
        saved = None
        if label == "diffusers PAG":
            saved = dict(case.denoiser.attn_processors)
            for layer in info.select(case.layers, kinds=("self", "joint")):
                layer.module.set_processor(case.pag_processor)
        handle = setup()
        try:
            step = _call(case, step_inputs)
            peak = peak_bytes(step, device)
            rows.append((label, seconds(step, device, repeats), peak))
        finally:
            if handle is not None:
                handle.remove()
            if saved is not None:
                case.denoiser.set_attn_processor(saved)
    case.denoiser.to("cpu")
    return rows


def print_table(results: dict[str, tuple[str, list[tuple[str, float, int]]]]) -> None:
    print(f"\n{'model':<12} {'config':<22} {'s/step':>9} {'x plain':>8} {'x layer':>8} {'peak MiB':>9} {'x plain':>8}")
    for name, (note, rows) in results.items():
        base_time, base_mem = rows[0][1], rows[0][2]
        layer_time = next(t for label, t, _ in rows if label == "ours layer")
        for label, t, mem in rows:
            print(
                f"{name:<12} {label:<22} {t:>9.4f} {t / base_time:>8.3f} {t / layer_time:>8.3f} "
                f"{mem / 2**20:>9.1f} {mem / max(base_mem, 1):>8.3f}"
            )
        print(f"{'':<12} ({note})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-sd15,tiny-sd3,sd15,sd3-medium")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for name in tqdm(args.models.split(","), desc="models"):
        case = build_case(name)
        results[name] = (case.note, measure(case, args.repeats, device))
        del case
    print(f"device: {device}, threads: {args.threads}, repeats: {args.repeats} (median)")
    print_table(results)


if __name__ == "__main__":
    main()
