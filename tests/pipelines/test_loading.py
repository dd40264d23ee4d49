from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attnsurgery.pipelines.loading import load_pipeline, single_file_pipeline_class
from attnsurgery.testing import tiny
from tests.support.pipes import run_pipe


def test_local_folder_round_trip(tmp_path):
    pipe = tiny.tiny_sd15()
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path), dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    # same weights; the reloaded text encoder may pick another attention kernel, hence a float tolerance
    assert torch.allclose(run_pipe(loaded), run_pipe(pipe), atol=1e-5)


def test_offline_hub_id_says_how_to_use_a_local_folder():
    with pytest.raises(FileNotFoundError, match="download it elsewhere and pass the local folder"):
        load_pipeline("someone/not-cached-model")


def test_bad_paths_and_dtypes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        load_pipeline(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_pipeline(tmp_path, dtype="fp8")


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        ("model.diffusion_model.output_blocks.11.0.skip_connection.weight", (4,), "StableDiffusionPipeline"),
        ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", (4,), "StableDiffusionXLPipeline"),
    ],
)
def test_single_file_type_from_state_dict_keys(key, shape, expected):
    # synthetic checkpoints: only the keys that identify the architecture (real weights cannot be fetched here)
    assert single_file_pipeline_class({key: torch.zeros(shape)}) == expected


def test_single_file_offline_asks_for_a_local_config(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(4)}, str(path))
    with pytest.raises(FileNotFoundError, match="pass config=<local diffusers folder"):
        load_pipeline(path)


def test_a_reference_trainer_folder_loads_by_path(tmp_path):
    from attnsurgery.reference.model import build_reference_pipeline, save_reference_weights

    pipe = build_reference_pipeline()
    save_reference_weights(pipe, tmp_path)
    loaded = load_pipeline(tmp_path)
    weight = "conv_in.weight"
    assert torch.equal(loaded.unet.state_dict()[weight], pipe.unet.state_dict()[weight].half().float())


def test_the_readme_main_job_runs_offline_with_the_default_model(tmp_path):
    import shlex

    from attnsurgery.cli import main

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [line] = [
        line
        for line in readme.splitlines()
        if line.startswith('attnsurgery generate "a red circle and a') and "--model" not in line
    ]
    argv = shlex.split(line.split("#")[0])[1:]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == int(argv[argv.index("--num-images") + 1])


def test_default_model_without_its_weights_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from attnsurgery.cli import main
    from attnsurgery.reference import model

    monkeypatch.setattr(model, "WEIGHTS_DIR", tmp_path / "missing")  # as if the package data were lost
    assert main(["generate", "a red circle", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "reference weights not found" in err and "train them" in err and len(err.splitlines()) == 1
