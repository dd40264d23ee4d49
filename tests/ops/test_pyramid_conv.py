"""The pyramid conv block against a plainly written float64 version of the paper's maths."""

from __future__ import annotations

import math

import pytest
import torch

from attnsurgery.ops.pyramid_conv import KERNEL_PRESETS, PyramidConvBlock, kernel_preset


def _adaptive_avg_pool(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """[C, H, W] -> [C, out_h, out_w]; bin i covers [floor(i H / out), ceil((i + 1) H / out))."""
    channels, height, width = x.shape
    out = torch.zeros(channels, out_h, out_w, dtype=x.dtype)
    for i in range(out_h):
        r0, r1 = (i * height) // out_h, -(-((i + 1) * height) // out_h)
        for j in range(out_w):
            c0, c1 = (j * width) // out_w, -(-((j + 1) * width) // out_w)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(dim=(1, 2))
    return out


def _depthwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[C, H, W] * [C, k, k] with zero 'same' padding, as a sum over kernel offsets."""
    channels, height, width = x.shape
    k = weight.shape[-1]
    pad = k // 2
    padded = torch.zeros(channels, height + 2 * pad, width + 2 * pad, dtype=x.dtype)
    padded[:, pad : pad + height, pad : pad + width] = x
    out = torch.zeros_like(x)
    for di in range(k):
        for dj in range(k):
            out += weight[:, di, dj, None, None] * padded[:, di : di + height, dj : dj + width]
    return out


def _bilinear(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """[C, h, w] -> [C, out_h, out_w], half-pixel centres (align_corners=False), edges clamped."""
    _, height, width = x.shape

    def taps(n_out: int, n_in: int) -> list[tuple[int, int, float]]:
        result = []
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = min(int(math.floor(src)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            result.append((lo, hi, src - lo))
        return result

    rows, cols = taps(out_h, height), taps(out_w, width)
    out = torch.zeros(x.shape[0], out_h, out_w, dtype=x.dtype)
    for i, (r0, r1, fr) in enumerate(rows):
        for j, (c0, c1, fc) in enumerate(cols):
            out[:, i, j] = (
                (1 - fr) * (1 - fc) * x[:, r0, c0]
                + (1 - fr) * fc * x[:, r0, c1]
                + fr * (1 - fc) * x[:, r1, c0]
                + fr * fc * x[:, r1, c1]
            )
    return out


def reference_block(block: PyramidConvBlock, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The block's maths in float64, one image at a time, from the spec (not from the module's code)."""
    p = {name: t.detach().double() for name, t in block.state_dict().items()}
    height, width = grid
    channels = block.channels
    outputs = []
    for x in tokens.double():
        up = x @ p["conv_up.weight"].T + p["conv_up.bias"]  # [N, C/2]
        image = up.T.reshape(channels // 2, height, width)
        stages = []
        for index, scale in enumerate(block.scales):
            y = image
            if scale != 1.0:
                pooled = (max(1, math.floor(height * scale)), max(1, math.floor(width * scale)))
                y = _adaptive_avg_pool(y, *pooled)
            y = _depthwise_conv(y, p[f"dw_convs.{index}.weight"][:, 0])
            x1, x2 = y[: channels // 4], y[channels // 4 :]
            if block.gate == "mul":
                y = x1 * x2 * math.sqrt(channels / 4)
            elif block.gate == "div":
                y = x1 * x2 / math.sqrt(channels / 4)
            else:
                y = x1 / (1 + torch.exp(-x2))
            if y.shape[1:] != (height, width):
                y = _bilinear(y, height, width)
            stages.append(y.reshape(channels // 4, -1).T)
        out = torch.cat(stages, dim=-1) @ p["conv_out.weight"].T + p["conv_out.bias"]
        pooled = x.mean(dim=0) @ p["conv_pool.weight"].T + p["conv_pool.bias"]
        outputs.append(out + pooled)
    return torch.stack(outputs)


def _randomised(block: PyramidConvBlock, generator: torch.Generator) -> PyramidConvBlock:
    """Give every weight an O(1) random value so the test exercises all terms, not the near-zero init."""
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return block


@pytest.mark.parametrize("gate", ["mul", "div", "sigmoid"])
@pytest.mark.parametrize("grid", [(8, 6), (7, 5), (1, 3)])
def test_matches_float64_reference(gate: str, grid: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    block = _randomised(PyramidConvBlock(16, kernel_size=5, gate=gate), generator)
    tokens = torch.randn(2, grid[0] * grid[1], 16, generator=generator)
    expected = reference_block(block, tokens, grid)
    got = block(tokens, grid)
    assert expected.abs().mean() > 0.1  # the comparison is about a non-trivial output
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.double()(tokens.double(), grid), expected, rtol=1e-10, atol=1e-10)


def test_pooled_stage_matters_and_is_spatial() -> None:
    """Each stage and the pool branch change the output; tokens far apart stay independent of one another
    at scale 1 alone (a k x k conv only reaches k // 2 cells)."""
    generator = torch.Generator().manual_seed(1)
    block = _randomised(PyramidConvBlock(8, kernel_size=3, scales=(1.0,)), generator)
    with torch.no_grad():
        block.conv_pool.weight.zero_()
    tokens = torch.randn(1, 10 * 10, 8, generator=generator)
    changed = tokens.clone()
    changed[0, 0] += 1.0  # top-left cell
    delta = (block(changed, (10, 10)) - block(tokens, (10, 10))).abs().sum(-1).reshape(10, 10)
    assert delta[0, 0] > 0 and delta[1, 1] > 0
    assert delta[2:, :].max() == 0 and delta[:, 2:].max() == 0


def test_shapes_and_gradients_reach_every_parameter() -> None:
    block = PyramidConvBlock(32, kernel_size=7)
    tokens = torch.randn(3, 9 * 11, 32, requires_grad=True)
    out = block(tokens, (9, 11))
    assert out.shape == tokens.shape
    out.square().sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_init_starts_near_zero() -> None:
    torch.manual_seed(0)
    block = PyramidConvBlock(320, kernel_size=9)
    tokens = torch.nn.functional.layer_norm(torch.randn(1, 16 * 16, 320), (320,))
    ratio = block(tokens, (16, 16)).norm() / tokens.norm()
    assert 0 < ratio < 0.01


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        PyramidConvBlock(30, kernel_size=3)
    with pytest.raises(ValueError, match="odd"):
        PyramidConvBlock(32, kernel_size=4)
    with pytest.raises(ValueError, match="gate"):
        PyramidConvBlock(32, kernel_size=3, gate="tanh")  # type: ignore[arg-type]
    block = PyramidConvBlock(32, kernel_size=3)
    with pytest.raises(ValueError, match="holds 12 tokens"):
        block(torch.randn(1, 16, 32), (3, 4))


def test_kernel_presets() -> None:
    assert kernel_preset("sd15") == {"down": (7, 9, 5), "mid": (3,), "up": (5, 9, 11)}
    assert kernel_preset("sd2") == KERNEL_PRESETS["sd15"]
    assert kernel_preset("sdxl") == {"down": (9, 7), "mid": (9,), "up": (9, 13)}
    with pytest.raises(NotImplementedError, match="explicit kernel sizes"):
        kernel_preset("flux")


def test_init_uses_only_the_given_generator() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = PyramidConvBlock(16, kernel_size=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), before)
    second = PyramidConvBlock(16, kernel_size=3, generator=torch.Generator().manual_seed(7))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert first.conv_up.weight.abs().max() <= 1 / 16**0.5
    assert first.conv_up.weight.std() > 0.1
