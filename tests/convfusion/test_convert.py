"""Converter from the released Delta-ConvFusion weights: parity with a plain float64 re-implementation of the
official block on synthetic official-format files, layout variants, clear errors, CLI, apply/remove."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import attnsurgery as surg
from attnsurgery import ConvFusion
from attnsurgery.cli import main
from attnsurgery.convfusion import convert_official
from attnsurgery.testing.tiny import tiny_sd15, tiny_sdxl

# Kernel sizes of the released models by UNet block (the authors' SD15ConvModel / SDXLConvModel defaults).
SD15_KERNELS = {
    "down_blocks.0": 7,
    "down_blocks.1": 9,
    "down_blocks.2": 5,
    "mid_block": 3,
    "up_blocks.1": 5,
    "up_blocks.2": 9,
    "up_blocks.3": 11,
}
SDXL_KERNELS = {"down_blocks.1": 9, "down_blocks.2": 7, "mid_block": 9, "up_blocks.0": 9, "up_blocks.1": 13}
SCALES = (1.0, 0.5)


# ------------------------------------------------------------------------------------------------------------
# The official block, re-implemented plainly from its published maths (BHWC input, Triton weight layout).
def _depthwise_bhwc(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Cross-correlation with zero 'same' padding, x [B, H, W, C], kernel [k, k, C], by shifted sums."""
    size = kernel.shape[0]
    pad = size // 2
    height, width = x.shape[1:3]
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))
    out = torch.zeros_like(x)
    for i in range(size):
        for j in range(size):
            out += padded[:, i : i + height, j : j + width, :] * kernel[i, j]
    return out


def official_block(x: torch.Tensor, weights: dict[str, torch.Tensor], gate: str = "mul") -> torch.Tensor:
    """x [B, H, W, C] -> [B, H, W, C], following the official PyramidConvBlockTriton forward."""
    w = {key: value.double() for key, value in weights.items()}
    batch, height, width, _ = x.shape
    hidden = x @ w["conv_up.weight"].T + w["conv_up.bias"]
    stages = []
    for index, scale in enumerate(SCALES):
        y = hidden
        if scale != 1.0:
            y = F.adaptive_avg_pool2d(y.permute(0, 3, 1, 2), (int(height * scale), int(width * scale)))
            y = y.permute(0, 2, 3, 1)
        y = _depthwise_bhwc(y, w[f"gates.{index}.conv_spatial.weight"])
        x1, x2 = y.chunk(2, dim=-1)
        if gate == "mul":
            y = x1 * (x2 / (hidden.shape[-1] / 2) ** -0.5)
        else:
            y = x1 * torch.sigmoid(x2)
        if scale != 1.0:
            y = F.interpolate(y.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False)
            y = y.permute(0, 2, 3, 1)
        stages.append(y)
    out = torch.cat(stages, dim=-1) @ w["conv_out.weight"].T + w["conv_out.bias"]
    pooled = x.mean(dim=(1, 2), keepdim=True) @ w["conv_pool.weight"].T + w["conv_pool.bias"]
    return out + pooled


def official_weights(channels: int, kernel: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One block's parameters in the official names and shapes, O(1)-ish random values, float32."""
    hidden = channels // 2

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    return {
        "conv_up.weight": rand(hidden, channels, scale=1 / math.sqrt(channels)),
        "conv_up.bias": rand(hidden, scale=0.1),
        **{f"gates.{i}.conv_spatial.weight": rand(kernel, kernel, hidden, scale=1 / kernel) for i in range(2)},
        "conv_out.weight": rand(channels, hidden // 2 * 2, scale=0.5 / math.sqrt(hidden)),
        "conv_out.bias": rand(channels, scale=0.02),
        "conv_pool.weight": rand(channels, channels, scale=0.3 / math.sqrt(channels)),
        "conv_pool.bias": rand(channels, scale=0.02),
    }


def _self_layers(pipe) -> dict[str, int]:
    return {
        layer.path: layer.module.to_q.in_features for layer in surg.describe(pipe.unet).layers if layer.kind == "self"
    }


def official_file(pipe, kernels: dict[str, int], seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """A synthetic official state dict covering every attn1 of ``pipe`` (keys '<block>.conv1.<param>')."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, channels in _self_layers(pipe).items():
        level = path.split(".attentions")[0]
        block = path.removesuffix(".attn1")
        for name, tensor in official_weights(channels, kernels[level], generator).items():
            state[f"{prefix}{block}.conv1.{name}"] = tensor
    return state


def _block_weights(state: dict[str, torch.Tensor], block: str) -> dict[str, torch.Tensor]:
    start = f"{block}.conv1."
    return {key[len(start) :]: value for key, value in state.items() if key.startswith(start)}


# ------------------------------------------------------------------------------------------------------------
def test_reference_is_sensitive_to_layout() -> None:
    """The parity below can fail: a transposed kernel or a swapped grid changes the official output."""
    generator = torch.Generator().manual_seed(1)
    weights = official_weights(32, 5, generator)
    x = torch.randn(2, 6, 10, 32, generator=generator, dtype=torch.float64)
    reference = official_block(x, weights)
    transposed = {k: v.transpose(0, 1) if "conv_spatial" in k else v for k, v in weights.items()}
    assert (official_block(x, transposed) - reference).abs().max() > 1e-3
    block = convert_official_block(weights)
    tokens = x.reshape(2, 60, 32)
    torch.testing.assert_close(block(tokens, (6, 10)).reshape(x.shape), reference, rtol=1e-9, atol=1e-9)
    assert (block(tokens, (10, 6)).reshape(x.shape) - reference).abs().max() > 1e-3


def convert_official_block(weights: dict[str, torch.Tensor]):
    """Convert one block through the public converter (a one-layer view of a tiny SD1.5 file)."""
    pipe = tiny_sd15()
    state = official_file(pipe, SD15_KERNELS)
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    state.update({f"{block}.conv1.{name}": value for name, value in weights.items()})
    return convert_official(state, pipe).blocks[f"{block}.attn1"].double()


@pytest.mark.parametrize("gate", ["mul", "sigmoid"])
def test_converted_blocks_equal_the_official_block(gate: str) -> None:
    pipe = tiny_sd15()
    state = official_file(pipe, SD15_KERNELS, seed=2)
    plugin = convert_official(state, pipe, gate=gate)
    assert set(plugin.blocks) == set(_self_layers(pipe))
    generator = torch.Generator().manual_seed(3)
    for path, grid in [
        ("down_blocks.0.attentions.1.transformer_blocks.0.attn1", (7, 12)),
        ("mid_block.attentions.0.transformer_blocks.0.attn1", (3, 5)),
        ("up_blocks.3.attentions.2.transformer_blocks.0.attn1", (11, 6)),
    ]:
        block = plugin.blocks[path].double()
        assert block.kernel_size == SD15_KERNELS[path.split(".attentions")[0]] and block.gate == gate
        x = torch.randn(2, *grid, block.channels, generator=generator, dtype=torch.float64)
        reference = official_block(x, _block_weights(state, path.removesuffix(".attn1")), gate)
        spatial = reference - reference.mean(dim=(1, 2), keepdim=True)  # the conv part, pool branch aside
        assert spatial.abs().mean() > 0.05  # a non-trivial output to compare
        ours = block(x.reshape(2, -1, block.channels), grid).reshape(reference.shape)
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


def test_sdxl_file_with_prefix_and_half_precision(tmp_path: Path) -> None:
    pipe = tiny_sdxl()
    state = official_file(pipe, SDXL_KERNELS, seed=4, prefix="denoiser.")
    save_file({key: value.half() for key, value in state.items()}, str(tmp_path / "official.safetensors"))
    plugin = convert_official(tmp_path / "official.safetensors", pipe)
    assert set(plugin.blocks) == set(_self_layers(pipe)) and len(plugin.blocks) == 70
    path = "mid_block.attentions.0.transformer_blocks.9.attn1"
    block = plugin.blocks[path].double()
    assert block.kernel_size == 9
    weights = {k: v.half().double() for k, v in _block_weights(state, "denoiser." + path[:-6]).items()}
    x = torch.randn(1, 4, 6, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(
        block(x.reshape(1, 24, 64), (4, 6)).reshape(x.shape), official_block(x, weights), rtol=1e-9, atol=1e-9
    )


def test_plain_pytorch_layout_converts_the_same() -> None:
    """1x1-conv projections, [C', 1, k, k] depthwise kernels and no conv_up bias (the authors' plain block)."""
    pipe = tiny_sd15()
    state = official_file(pipe, SD15_KERNELS, seed=6)
    plain = {}
    for key, value in state.items():
        if key.endswith("conv_up.bias"):
            value = torch.zeros_like(value)
            state[key] = value
            continue
        if "conv_spatial" in key:
            value = value.permute(2, 0, 1).unsqueeze(1)
        elif value.dim() == 2:
            value = value[:, :, None, None]
        plain[key] = value
    expected, converted = convert_official(state, pipe), convert_official(plain, pipe)
    for path, block in expected.blocks.items():
        for (name, a), b in zip(block.state_dict().items(), converted.blocks[path].state_dict().values(), strict=True):
            assert torch.equal(a, b), (path, name)


def test_converted_plugin_applies_to_the_unet_and_remove_restores(tmp_path: Path) -> None:
    """Whole tiny UNet (float64, a non-square latent): our converted blocks == the official blocks in attn1's
    place; remove() gives back the original model; the saved folder loads to the same outputs."""
    pipe = tiny_sd15()
    unet = pipe.unet.double()
    state = official_file(pipe, SD15_KERNELS, seed=7)
    generator = torch.Generator().manual_seed(8)
    sample = torch.randn(1, 4, 16, 24, generator=generator, dtype=torch.float64)
    text = torch.randn(1, 77, 32, generator=generator, dtype=torch.float64)

    def call() -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, 500, text).sample

    baseline = call()
    modules = dict(unet.named_modules())
    reference = _with_official_blocks(unet, state, sample.shape[-2:], call)
    assert (reference - baseline).abs().max() > 1e-2  # the blocks matter
    plugin = convert_official(state, pipe)
    handle = surg.apply(pipe, plugin)
    torch.testing.assert_close(call(), reference, rtol=1e-8, atol=1e-8)
    handle.remove()
    assert all(dict(unet.named_modules())[name] is module for name, module in modules.items())
    assert torch.equal(call(), baseline)
    plugin.save(tmp_path / "cf")
    with surg.patched(pipe, ConvFusion.from_pretrained(tmp_path / "cf")):
        torch.testing.assert_close(call(), reference, rtol=1e-6, atol=1e-6)  # saved as float32


class _OfficialAttn1(torch.nn.Module):
    """attn1's place in the reference run: the plain official block on the latent's token grid."""

    def __init__(self, weights: dict[str, torch.Tensor], latent: tuple[int, int]) -> None:
        super().__init__()
        self.weights, self.latent = weights, latent

    def forward(self, hidden_states: torch.Tensor, **_: object) -> torch.Tensor:
        batch, tokens, channels = hidden_states.shape
        factor = math.isqrt(self.latent[0] * self.latent[1] // tokens)
        grid = (self.latent[0] // factor, self.latent[1] // factor)
        out = official_block(hidden_states.reshape(batch, *grid, channels), self.weights)
        return out.reshape(batch, tokens, channels)


def _with_official_blocks(unet, state, latent, call) -> torch.Tensor:
    originals = {}
    for path in [name for name, _ in unet.named_modules() if name.endswith(".attn1")]:
        parent = unet.get_submodule(path.removesuffix(".attn1"))
        originals[path] = parent.attn1
        parent.attn1 = _OfficialAttn1(_block_weights(state, path.removesuffix(".attn1")), tuple(latent))
    try:
        return call()
    finally:
        for path, module in originals.items():
            unet.get_submodule(path.removesuffix(".attn1")).attn1 = module


def test_cli_converts_against_a_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipe = tiny_sd15()
    pipe.unet.save_pretrained(tmp_path / "unet")
    state = official_file(pipe, SD15_KERNELS, seed=9)
    save_file(state, str(tmp_path / "official.safetensors"))
    argv = [
        "convert-convfusion",
        str(tmp_path / "official.safetensors"),
        "--model",
        str(tmp_path / "unet"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    assert "16 ConvFusion blocks" in capsys.readouterr().out
    loaded, direct = ConvFusion.from_pretrained(tmp_path / "out"), convert_official(state, pipe)
    for path, block in direct.blocks.items():
        for a, b in zip(block.state_dict().values(), loaded.blocks[path].state_dict().values(), strict=True):
            assert torch.equal(a, b)
    surg.apply(pipe, loaded).remove()  # the fingerprint of the config-only model matches the real one
    assert main([*argv[:2], "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0.conv1"


def _edited(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    state = official_file(tiny_sd15(), SD15_KERNELS)
    for name, value in changes.items():
        key = f"{BLOCK}.{name.replace('__', '.')}"
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"conv_out__bias": None}, r"lacks \['conv_out.bias'\]"),
        ({"gates__1__conv_spatial__weight": None}, r"lacks \['gates.1.conv_spatial.weight'\]"),
        ({"gates__2__conv_spatial__weight": torch.zeros(7, 7, 8)}, r"has gates \[0, 1, 2\]"),
        ({"gates__0__conv_spatial__bias": torch.zeros(8)}, "bias on its depthwise convs"),
        ({"extra__weight": torch.zeros(1)}, r"unexpected parameters \['extra.weight'\]"),
        ({"conv_pool__weight": torch.zeros(16, 17)}, r"conv_pool.weight has shape \[16, 17\], expected \[16, 16\]"),
        ({"conv_up__weight": torch.zeros(6, 16)}, "hidden width of half"),
        (
            {
                "gates__0__conv_spatial__weight": torch.zeros(6, 6, 8),
                "gates__1__conv_spatial__weight": torch.zeros(6, 6, 8),
            },
            "odd size",
        ),
        (
            {
                "gates__0__conv_spatial__weight": torch.zeros(7, 7, 8),
                "gates__1__conv_spatial__weight": torch.zeros(5, 5, 8),
            },
            r"kernel sizes \[5, 7\]",
        ),
        ({"gates__0__conv_spatial__weight": torch.zeros(7, 7, 9)}, r"expected a depthwise kernel over 8"),
        ({"conv_out__weight": torch.zeros(16, 8, 3)}, r"expected a linear weight"),
    ],
)
def test_bad_blocks_fail_clearly(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_official(_edited(**changes), tiny_sd15())


def test_files_that_do_not_fit_the_model_fail_clearly(tmp_path: Path) -> None:
    pipe = tiny_sd15()
    state = official_file(pipe, SD15_KERNELS)
    whole = {**state, "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}  # e.g. a whole saved UNet
    with pytest.raises(ValueError, match=r"1 keys are no official ConvFusion block weights.*resnets"):
        convert_official(whole, pipe)
    assert len(convert_official(whole, pipe, skip_other_keys=True).blocks) == 16
    with pytest.raises(ValueError, match="do not match this sdxl model"):
        convert_official(state, tiny_sdxl())
    partial = {k: v for k, v in state.items() if not k.startswith("mid_block.")}
    with pytest.raises(ValueError, match=r"1 of its 16 attn1 layers have no block.*mid_block.attentions.0"):
        convert_official(partial, pipe)
    wide = dict(state)
    wide.update(
        {f"{BLOCK}.{name}": value for name, value in official_weights(32, 7, torch.Generator().manual_seed(0)).items()}
    )
    with pytest.raises(ValueError, match="is 32 channels wide, the model's .* 16"):
        convert_official(wide, pipe)
    with pytest.raises(ValueError, match="different prefixes"):
        convert_official({**state, **{f"unet.{k}": v for k, v in state.items()}}, pipe)
    with pytest.raises(ValueError, match="gate must be one of"):
        convert_official(state, pipe, gate="div")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="No such file"):
        convert_official(tmp_path / "missing.safetensors", pipe)
