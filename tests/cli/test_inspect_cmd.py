import pytest

from attnsurgery.cli import main
from attnsurgery.testing import tiny


@pytest.fixture(scope="module")
def saved_sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    tiny.tiny_sd15().save_pretrained(folder)
    return folder


def table_rows(text):
    prefixes = ("down_", "mid_", "up_", "transformer_", "single_", "noise_refiner", "context_refiner", "layers.")
    return [line.split() for line in text.splitlines() if line.startswith(prefixes)]


def test_inspect_a_saved_pipeline_folder(saved_sd15, capsys):
    assert main(["inspect", str(saved_sd15), "--height", "512", "--width", "768"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sd15 (unet), native 256px, image 512x768, latent 64x96")
    rows = table_rows(out)
    assert len(rows) == 32
    top = next(r for r in rows if r[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert top[1:5] == ["self", "8", "2", "64x96"]
    mid = next(r for r in rows if r[0] == "mid_block.attentions.0.transformer_blocks.0.attn1")
    assert mid[4] == "8x12"
    assert abs(sum(float(r[5]) for r in rows) - 100) < 0.1
    # the top self-attention layers dominate: quadratic in tokens
    assert float(top[5]) > 10 * float(mid[5])


def test_inspect_a_bare_denoiser_folder(tmp_path, capsys):
    tiny.tiny_flux().transformer.save_pretrained(tmp_path / "transformer")
    assert main(["inspect", str(tmp_path / "transformer"), "--height", "256", "--width", "256"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["joint", "joint", "single", "single"]
    assert rows[0][4] == "16x16"
    assert {r[6] for r in rows} == {"first"}


@pytest.mark.parametrize(
    "builder, native, kinds, placements",
    [
        (tiny.tiny_flux2, 1024, ["joint"] * 2 + ["single"] * 2, ["first"] * 4),
        (tiny.tiny_qwenimage, 1328, ["joint"] * 2, ["first"] * 2),
        (tiny.tiny_zimage, 1024, ["self"] * 2 + ["text"] * 2 + ["single"] * 2, ["last"] * 2 + ["-"] * 2 + ["last"] * 2),
        (tiny.tiny_chroma, 1024, ["joint"] * 2 + ["single"] * 2, ["first"] * 4),
    ],
)
def test_inspect_the_newer_dits(builder, native, kinds, placements, tmp_path, capsys):
    """A saved pipeline folder at its native size: kinds, text placement, image grid (2x2 latent cells per
    token, 16 px per token) and the text count on Z-Image's text-only layers."""
    builder().save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.split(" (")[0] in ("flux2", "qwenimage", "zimage", "chroma") and f"native {native}px" in out
    rows = table_rows(out)
    assert [r[1] for r in rows] == kinds and [r[6] for r in rows] == placements
    side = native // 16
    assert {r[4] for r in rows if r[1] != "text"} == {f"{side}x{side}"}
    assert {r[4] for r in rows if r[1] == "text"} <= {"text:128"}
    assert abs(sum(float(r[5]) for r in rows) - 100) < 0.1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "/no/such/folder"], "no such folder"),
        (["inspect", "someone/some-model"], "could not be reached"),
        (["inspect", "."], "has neither model_index.json"),
    ],
)
def test_inspect_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_inspect_rejects_non_positive_sizes(saved_sd15, capsys):
    assert main(["inspect", str(saved_sd15), "--height", "-8"]) == 2
    assert "--height must be a positive number of pixels" in capsys.readouterr().err


@pytest.mark.parametrize(
    "model, first_line, layers",
    [
        ("reference", "sd15 (unet), native 64px, image 128x128, latent 32x32", 32),
        ("reference-flux", "flux (mmdit), native 64px, image 128x128, latent 32x32", 9),
    ],
)
def test_inspect_the_reference_models_by_name(model, first_line, layers, capsys):
    assert main(["inspect", model, "--height", "128", "--width", "128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(first_line)
    assert len(table_rows(out)) == layers


def test_inspect_a_folder_the_reference_trainer_wrote(tmp_path, capsys):
    from attnsurgery.reference.flux_model import build_reference_flux_pipeline, save_reference_flux_weights

    save_reference_flux_weights(build_reference_flux_pipeline(), tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flux (mmdit), native 64px, image 64x64, latent 16x16")
    assert next(r for r in table_rows(out) if r[0] == "transformer_blocks.0.attn")[1:5] == ["joint", "6", "32", "8x8"]
