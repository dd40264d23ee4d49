import numpy as np
import pytest
from PIL import Image

from attnsurgery.cli import main
from attnsurgery.pipelines.metadata import GenerationParams, read_png_params, save_png
from attnsurgery.testing import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny.tiny_sd15().save_pretrained(folder)
    return str(folder)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_pngs_that_replay_exactly(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "generate",
        "a red circle",
        "--model",
        model_dir,
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "5",
        "--num-images",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--negative-prompt",
        "blur",
    ]
    assert main(argv) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2
    first, second = (read_png_params(p) for p in paths)
    assert (first.seed, second.seed) == (5, 6)
    assert first.negative_prompt == "blur" and first.model == model_dir
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))  # different seeds, different images
    with Image.open(paths[0]) as image:
        expected = "a red circle\nNegative prompt: blur\nSteps: 2, CFG scale: 7.5, Seed: 5"
        assert image.text["parameters"].startswith(expected)

    replay = tmp_path / "replay"
    assert main(["generate", "--from-png", paths[1], "--out", str(replay), "--no-progress"]) == 0
    replayed = capsys.readouterr().out.split()
    assert np.array_equal(pixels(replayed[0]), pixels(paths[1]))
    # an explicit flag overrides the stored value
    assert main(["generate", "--from-png", paths[1], "--seed", "9", "--out", str(replay), "--no-progress"]) == 0
    assert read_png_params(capsys.readouterr().out.split()[0]).seed == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate"], "give a PROMPT"),
        (["generate", "x", "--steps", "0"], "--steps must be positive"),
        (["generate", "x", "--cfg", "-1"], "--cfg must be non-negative"),
        (["generate", "x", "--plugin", "HiDiffusion"], "--plugin takes a JSON object"),
        (["generate", "x", "--plugin", '{"type": "Nope"}', "--model", "MODEL"], "unknown plugin type 'Nope'"),
        (["generate", "x", "--model", "/no/such/model"], "no such file or folder"),
    ],
)
def test_generate_bad_arguments_are_one_line(argv, message, model_dir, tmp_path, capsys):
    argv = [model_dir if a == "MODEL" else a for a in argv] + ["--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_png_without_our_metadata_is_rejected(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ValueError, match="carries no attnsurgery generation parameters"):
        read_png_params(path)
    params = GenerationParams("a blue square", plugins=({"type": "X", "layers": ["a", "b"]},))
    save_png(Image.new("RGB", (4, 4)), path, params)
    assert read_png_params(path) == params


def test_the_reference_model_samples_with_its_own_guidance_scale(tmp_path, capsys):
    from attnsurgery.pipelines.loading import DEFAULT_GUIDANCE_SCALE, default_guidance_scale
    from attnsurgery.reference.model import GUIDANCE_SCALE, build_reference_pipeline, save_reference_weights

    weights = tmp_path / "weights"
    save_reference_weights(build_reference_pipeline(), weights)  # random weights in the trainer's layout
    assert GUIDANCE_SCALE != DEFAULT_GUIDANCE_SCALE
    assert default_guidance_scale("reference") == default_guidance_scale(weights) == GUIDANCE_SCALE
    assert default_guidance_scale(tmp_path) == DEFAULT_GUIDANCE_SCALE  # a folder without reference weights
    argv = [
        "generate",
        "a red circle",
        "--model",
        str(weights),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert read_png_params(capsys.readouterr().out.split()[0]).cfg == GUIDANCE_SCALE


def test_neighborhood_flags_act_and_replay_from_the_png(tmp_path, capsys):
    """``--na`` on the reference DiT: the image changes, the PNG records the plugin, a replay is exact."""
    common = ["a red circle", "--model", "reference-flux", "--steps", "2", "--seed", "3", "--no-progress"]
    assert main(["generate", *common, "--out", str(tmp_path / "plain")]) == 0
    (plain,) = capsys.readouterr().out.split()
    flags = ["--na", "--na-force", "--na-window", "4", "--na-stride", "2"]
    assert main(["generate", *common, *flags, "--out", str(tmp_path / "na")]) == 0
    (local,) = capsys.readouterr().out.split()
    assert not np.array_equal(pixels(plain), pixels(local))
    (plugin,) = read_png_params(local).plugins
    assert plugin == {**plugin, "type": "NeighborhoodAttention", "window": [4, 4], "stride": [2, 2], "force": True}
    assert main(["generate", "--from-png", local, "--out", str(tmp_path / "replay"), "--no-progress"]) == 0
    assert np.array_equal(pixels(capsys.readouterr().out.split()[0]), pixels(local))
