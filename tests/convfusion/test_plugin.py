"""ConvFusion plugin: attn1 swaps on tiny SD1.5/SDXL trees, exact restore, save/load, architecture checks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import attnsurgery as surg
from attnsurgery import ConvFusion
from attnsurgery.convfusion import ConvFusionAttention
from attnsurgery.convfusion.format import FORMAT
from attnsurgery.testing.tiny import tiny_flux, tiny_sd15, tiny_sdxl


def _unet_call(unet: torch.nn.Module, seed: int = 0, side: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, side, side, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 500, text).sample


def _randomise(plugin: ConvFusion, seed: int = 0) -> None:
    """O(1) weights everywhere, so the blocks change the output visibly (the init is near zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in plugin.blocks.values():
            for param in block.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_replaces_every_self_attention_and_remove_restores() -> None:
    pipe = tiny_sd15()
    unet = pipe.unet
    before = dict(unet.named_modules())
    baseline = _unet_call(unet)
    self_layers = [layer.path for layer in surg.describe(unet).layers if layer.kind == "self"]
    assert len(self_layers) == 16  # SD1.5: 6 down, 1 mid, 9 up transformer blocks
    handle = surg.apply(pipe, ConvFusion())
    replaced = {p for p, m in unet.named_modules() if isinstance(m, ConvFusionAttention)}
    assert replaced == set(self_layers)
    _randomise(ConvFusion.extract(pipe))
    changed = _unet_call(unet)
    assert torch.isfinite(changed).all() and (changed - baseline).abs().max() > 1e-3
    handle.remove()
    after = dict(unet.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert torch.equal(_unet_call(unet), baseline)


def test_kernel_presets_follow_the_blocks() -> None:
    pipe = tiny_sd15()
    with surg.patched(pipe, ConvFusion()):
        blocks = ConvFusion.extract(pipe).blocks
    kernels = {path.split(".attentions")[0]: block.kernel_size for path, block in blocks.items()}
    assert kernels == {
        "down_blocks.0": 7,
        "down_blocks.1": 9,
        "down_blocks.2": 5,
        "mid_block": 3,
        "up_blocks.1": 5,
        "up_blocks.2": 9,
        "up_blocks.3": 11,
    }
    sdxl = tiny_sdxl()
    with surg.patched(sdxl, ConvFusion(layers="down")):
        blocks = ConvFusion.extract(sdxl).blocks
    assert {b.kernel_size for p, b in blocks.items() if p.startswith("down_blocks.1.")} == {9}
    assert {b.kernel_size for p, b in blocks.items() if p.startswith("down_blocks.2.")} == {7}
    assert len(blocks) == 2 * 2 + 2 * 10  # transformer_layers_per_block (1, 2, 10), 2 attentions each


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    pipe = tiny_sd15()
    with surg.patched(pipe, ConvFusion(gate="sigmoid", seed=3)):
        trained = ConvFusion.extract(pipe)
        _randomise(trained, seed=1)
        expected = _unet_call(pipe.unet)
        trained.save(tmp_path / "cf")
    loaded = ConvFusion.from_pretrained(tmp_path / "cf")
    assert loaded.blocks.keys() == trained.blocks.keys()
    for path, block in trained.blocks.items():
        assert loaded.blocks[path].gate == "sigmoid" and loaded.blocks[path].kernel_size == block.kernel_size
        for (name, a), b in zip(block.state_dict().items(), loaded.blocks[path].state_dict().values(), strict=True):
            assert torch.equal(a, b), (path, name)
    other = tiny_sd15()  # same architecture, a fresh pipeline
    with surg.patched(other, loaded):
        assert torch.equal(_unet_call(other.unet), expected)
    again = surg.plugin_from_dict(loaded.to_dict())
    assert isinstance(again, ConvFusion) and again.source == str(tmp_path / "cf")


def test_wrong_architecture_fails_clearly(tmp_path: Path) -> None:
    pipe = tiny_sd15()
    with surg.patched(pipe, ConvFusion()):
        ConvFusion.extract(pipe).save(tmp_path / "cf")
    plugin = ConvFusion.from_pretrained(tmp_path / "cf")
    sdxl = tiny_sdxl()
    with pytest.raises(ValueError, match="another architecture"):
        surg.apply(sdxl, plugin)
    assert not surg.active_surgeries(sdxl)
    unet = pipe.unet
    unet.register_to_config(cross_attention_dim=48)  # same module tree, another text width: still refused
    with pytest.raises(ValueError, match="cross_attention_dim: saved 32, model 48"):
        surg.apply(unet, plugin)
    with pytest.raises(NotImplementedError, match="DiT"):
        surg.apply(tiny_flux(), ConvFusion())
    with pytest.raises(FileNotFoundError, match="convfusion.json"):
        ConvFusion.from_pretrained(tmp_path)


def test_lora_on_a_replaced_layer_warns() -> None:
    pipe = tiny_sd15()
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    layer.to_q.lora_A = torch.nn.ModuleDict()  # what PEFT adds to a LoRA-wrapped projection
    with pytest.warns(UserWarning, match="LoRA weights on 1 attn1 layers no longer apply"):
        handle = surg.apply(pipe, ConvFusion())
    handle.remove()
    del layer.to_q.lora_A
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        surg.apply(pipe, ConvFusion()).remove()


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="odd"):
        ConvFusion(kernel_size=4)
    with pytest.raises(ValueError, match="gate"):
        ConvFusion(gate="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="saved"):
        ConvFusion().save("unused")


def _saved(tmp_path: Path) -> Path:
    pipe = tiny_sd15()
    with surg.patched(pipe, ConvFusion()):
        return ConvFusion.extract(pipe).save(tmp_path / "cf")


def _drop_key(folder: Path, key: str) -> None:
    config = json.loads((folder / "convfusion.json").read_text())
    del config["blocks"][0][key]
    (folder / "convfusion.json").write_text(json.dumps(config))


def _resize_a_tensor(folder: Path) -> None:
    tensors = load_file(str(folder / "convfusion.safetensors"))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3)
    save_file(tensors, str(folder / "convfusion.safetensors"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "convfusion.json").write_text("{not json"), r"convfusion.json is not valid JSON"),
        (lambda f: (f / "convfusion.safetensors").write_bytes(b"\x00" * 16), "convfusion.safetensors is not a"),
        (lambda f: _drop_key(f, "kernel_size"), r"convfusion.json: block entry 0 .* lacks 'kernel_size'"),
        (lambda f: (f / "convfusion.json").write_text(json.dumps({"format": FORMAT, "fingerprint": {}})), "'blocks'"),
        (_resize_a_tensor, r"convfusion.safetensors does not fit its config for .*: size mismatch"),
    ],
    ids=["json", "safetensors", "entry-key", "top-key", "shape"],
)
def test_a_damaged_folder_names_the_file_and_the_damage(tmp_path: Path, damage, message) -> None:
    folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=message):
        ConvFusion.from_pretrained(folder)
