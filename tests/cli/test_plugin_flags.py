import argparse
import json

import numpy as np
import pytest
from PIL import Image

import attnsurgery as surg
from attnsurgery.cli import main
from attnsurgery.cli.plugin_flags import add_plugin_flags, plugins_from_args
from attnsurgery.pipelines.metadata import read_png_params
from attnsurgery.testing import tiny

PLUGINS = [
    surg.HiDiffusion(t1=0.5, shift="cycle", force=True),
    surg.AgentAttention(agent_source="pool", layers="down_blocks.0"),
    surg.TokenMerging(ratio=0.3, layers=("down_blocks.0", "up_blocks.3")),
    surg.PerturbedAttention(scale=2.0, heads=("mid_block.attentions.0.transformer_blocks.0.attn1:3", (1, 2)), soft=0.5),
]


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: type(p).__name__)
def test_every_plugin_round_trips_through_json(plugin):
    # the CLI, PNG metadata and ComfyUI nodes all carry plugins as JSON
    assert surg.plugin_from_dict(json.loads(json.dumps(plugin.to_dict()))) == plugin


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny.tiny_sd15().save_pretrained(folder)
    return str(folder)


def generate(model_dir, out, *flags):
    argv = [
        "generate",
        "a red circle",
        "--model",
        model_dir,
        "--steps",
        "2",
        "--height",
        "128",
        "--width",
        "128",
        "--out",
        str(out),
        "--no-progress",
        *flags,
    ]
    assert main(argv) == 0


def test_plugin_flags_change_the_image_and_replay_from_the_png(model_dir, tmp_path, capsys):
    generate(model_dir, tmp_path / "plain")
    plain = capsys.readouterr().out.split()[0]
    generate(model_dir, tmp_path / "patched", "--hidiffusion", "--hd-force", "--pag", "2.0")
    patched = capsys.readouterr().out.split()[0]
    types = [p["type"] for p in read_png_params(patched).plugins]
    assert types == ["HiDiffusion", "PerturbedAttention"]
    plain_pixels = np.asarray(Image.open(plain), dtype=np.int16)
    patched_pixels = np.asarray(Image.open(patched), dtype=np.int16)
    assert np.abs(plain_pixels - patched_pixels).max() > 0
    assert main(["generate", "--from-png", patched, "--out", str(tmp_path / "replay"), "--no-progress"]) == 0
    replay = capsys.readouterr().out.split()[0]
    assert np.array_equal(np.asarray(Image.open(replay), dtype=np.int16), patched_pixels)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pag", "2", "--pag-soft", "3"], "soft"),
        (["--hidiffusion", "--hd-force", "--tome", "0.3"], "conflict at down_blocks.0.attentions.0"),
    ],
)
def test_bad_plugin_flags_are_one_line_errors(flags, message, model_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", model_dir, *flags, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # may also hold the model-loading progress bars
    errors = [line for line in err.splitlines() if line.startswith("attnsurgery generate: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_pag_heads_flag_takes_several_heads_of_one_layer():
    parser = argparse.ArgumentParser()
    add_plugin_flags(parser)
    args = parser.parse_args(["--pag", "3", "--pag-heads", "up_blocks.1.attentions.0:0,3,mid_block:1"])
    (plugin,) = plugins_from_args(args)
    assert plugin.heads == ("up_blocks.1.attentions.0:0,3", "mid_block:1")
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    info = surg.describe(tiny.tiny_sd15().unet)
    assert {path: sorted(heads) for path, heads in info.select_heads(plugin.heads, kinds=("self",)).items()} == {
        "mid_block.attentions.0.transformer_blocks.0.attn1": [1],
        layer: [0, 3],
    }
