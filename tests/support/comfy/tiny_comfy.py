"""A tiny SD1.5-layout U-Net inside the real ComfyUI, and a deterministic sampler call.

The layout is SD1.5's (attention at input 1, 2, 4, 5, 7, 8, middle 0, output 3-11; 8 heads), only narrower, so
the block names and numbers that patches use are the real ones.
"""

from __future__ import annotations

from typing import Any

import torch

MODEL_CHANNELS = 32
CONTEXT_DIM = 64
LATENT_SIZE = 16  # 128 px: the input-1 blocks hold 256 tokens (a 16x16 grid), enough for windows and merges

TINY_SD15_UNET: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": MODEL_CHANNELS,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}  # SD15.__init__ adds num_heads=8, num_head_channels=-1, as in the real SD1.5


def _reset_parameters(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds layers with ``disable_weight_init`` (uninitialised memory): re-run torch's initialisers."""
    bases = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for sub in module.modules():
            base = next((b for b in bases if isinstance(sub, b)), None)
            if base is not None:
                base.reset_parameters(sub)


# SDXL's layout (no attention on the top level, attention from input 4; output blocks 0-5), narrower and one
# transformer per block; SDXL.__init__ adds num_head_channels=64, as in the real SDXL (1 and 2 heads here).
TINY_SDXL_UNET: dict[str, Any] = {
    **TINY_SD15_UNET,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 1, 1, 1, 1],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_linear_in_transformer": True,
}
SDXL_POOLED_DIM = 1280  # the pooled text embedding SDXL's adm input starts with (2816 = 1280 + 6 * 256)


def _patcher(base: type, unet: dict[str, Any], seed: int):
    """A ModelPatcher around a ``supported_models`` entry narrowed to the tiny widths, seeded."""
    import comfy.model_management as mm
    import comfy.model_patcher

    class Tiny(base):
        unet_config = dict(base.unet_config, model_channels=MODEL_CHANNELS, context_dim=CONTEXT_DIM)

    config = Tiny(dict(unet))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _reset_parameters(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def build_tiny_sd15(seed: int = 0):
    """A ``comfy.model_patcher.ModelPatcher`` around a seeded tiny SD1.5 (EPS) model."""
    import comfy.supported_models as sm

    return _patcher(sm.SD15, TINY_SD15_UNET, seed)


def build_tiny_sdxl(seed: int = 0):
    """A ``comfy.model_patcher.ModelPatcher`` around a seeded tiny SDXL (EPS) model."""
    import comfy.supported_models as sm

    return _patcher(sm.SDXL, TINY_SDXL_UNET, seed)


def conditioning(seed: int, pooled: bool = False) -> list:
    """ComfyUI conditioning without a text encoder: ``[[cond tensor, {}]]``; SDXL's also holds a pooled one."""
    generator = torch.Generator().manual_seed(seed)
    options = {"pooled_output": torch.randn(1, SDXL_POOLED_DIM, generator=generator)} if pooled else {}
    return [[torch.randn(1, 77, CONTEXT_DIM, generator=generator), options]]


def sample(
    model,
    positive: list,
    negative: list,
    steps: int = 3,
    cfg: float = 5.0,
    seed: int = 1,
    size: int | tuple[int, int] = LATENT_SIZE,
    channels: int = 4,
) -> torch.Tensor:
    """``comfy.sample.sample`` with euler / normal on a ``size`` x ``size`` (or (h, w)) latent of ``channels``
    (16 for the DiTs), in inference mode."""
    import comfy.sample

    height, width = (size, size) if isinstance(size, int) else size
    with torch.inference_mode():
        latent = torch.zeros([1, channels, height, width])
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(
            model, noise, steps, cfg, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed
        )
