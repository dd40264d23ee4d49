import math

import pytest

from attnsurgery.cli import main
from attnsurgery.reference.model import build_reference_pipeline, save_reference_weights


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    # the reference architecture with random weights: the command's wiring, not the model's quality
    folder = tmp_path_factory.mktemp("reference")
    save_reference_weights(build_reference_pipeline(), folder)
    return str(folder)


def test_eval_prints_plain_and_plugin_rows_at_each_size(reference_dir, capsys):
    argv = [
        "eval",
        "--model",
        reference_dir,
        "--pairs",
        "2",
        "--sizes",
        "1,2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--pag",
        "2.0",
        "--no-progress",
    ]
    assert main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [
        ("plain", "64"),
        ("plain", "128"),
        ("PerturbedAttention", "64"),
        ("PerturbedAttention", "128"),
    ]
    for row in rows:
        fidelity, duplication, clean = map(float, row[2:5])
        assert 0 <= fidelity <= 1 and 0 <= duplication <= 1
        assert math.isnan(clean) or 0 <= clean <= 1  # no detected object: the rate is undefined
    assert rows[0][-2:] == ["(1.00x", "plain)"]
    assert rows[0][5:7] == ["-", "-"]  # the plain rows are the closeness reference
    psnr, ssim = float(rows[2][5]), float(rows[2][6])
    assert 0 < psnr < math.inf and -1 <= ssim <= 1  # PAG changes the images (identical ones give inf)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--sizes", "1,x"], "--sizes takes comma-separated multiples"),
        (["eval", "--sizes", "0"], "--sizes needs positive multiples"),
        (["eval", "--pairs", "0"], "--pairs, --steps and --batch-size must be positive"),
        (["eval", "--plugin", "{nope"], "--plugin takes a JSON object"),
    ],
)
def test_eval_bad_arguments(argv, message, reference_dir, capsys):
    assert main([*argv, "--model", reference_dir]) == 2
    assert message in capsys.readouterr().err
