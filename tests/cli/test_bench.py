"""``attnsurgery bench`` on tiny models: a row per plugin flag group, ratios in the table, the JSON record, and
one-line errors for a bad model, device, dtype or a plugin the model does not support."""

from __future__ import annotations

import json
import re

import pytest
import torch

from attnsurgery.cli import main

torch.set_num_threads(1)

FAST = ["--steps", "1", "--repeats", "1", "--warmup", "1", "--device", "cpu", "--no-progress"]
SD15_ROWS = {
    "plain": [],
    "HiDiffusion": ["--hidiffusion", "--hd-force"],
    "TokenMerging": ["--tome", "0.5"],
    "AgentAttention": ["--agent"],
    "PerturbedAttention (heads)": ["--pag", "3.0", "--pag-heads", "mid_block.attentions.0:0,1"],
    "ConvFusion": ["--plugin", '{"type": "ConvFusion"}'],
}


def table(out: str) -> dict[str, list[str]]:
    """Row label -> cells, from the printed table (cells are split on runs of two or more spaces)."""
    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("config"))
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in lines[start + 1 :])}


def test_every_plugin_is_a_row_with_ratios_and_json(tmp_path, capsys):
    flags = [flag for row in SD15_ROWS.values() for flag in row]
    out_json = tmp_path / "bench.json"
    argv = [
        "bench",
        "--model",
        "tiny-sd15",
        "--height",
        "128",
        "--width",
        "128",
        *FAST,
        *flags,
        "--json",
        str(out_json),
    ]
    assert main(argv) == 0
    rows = table(capsys.readouterr().out)
    assert set(rows) == set(SD15_ROWS)
    for cells in rows.values():
        step_ms, step_speedup, image_s, image_speedup, peak, memory = cells
        assert float(step_ms.split()[0]) > 0 and float(image_s) > 0
        assert re.fullmatch(r"\d+\.\d\dx", step_speedup) and re.fullmatch(r"\d+\.\d\dx", image_speedup)
        assert (peak, memory) == ("n/a", "n/a")  # the CPU reports no peak
    assert rows["plain"][1] == "1.00x"
    record = json.loads(out_json.read_text())
    assert {"model", "height", "width", "steps", "device", "device_name", "dtype", "date", "versions"} <= set(record)
    assert record["model"] == "tiny-sd15" and record["dtype"] == "float32"
    by_label = {row["label"]: row for row in record["rows"]}
    assert set(by_label) == set(SD15_ROWS)
    hd = by_label["HiDiffusion"]
    assert hd["plugins"][0]["type"] == "HiDiffusion" and hd["plugins"][0]["force"] is True
    assert {"median", "low", "high", "values"} <= set(hd["step_s"]) and hd["step_speedup"] > 0
    assert hd["peak_bytes"] is None and hd["skipped"] is None


def test_a_dit_benchmarks_layer_and_head_pag(capsys):
    argv = [
        "bench",
        "--model",
        "tiny-flux",
        "--height",
        "64",
        "--width",
        "64",
        *FAST,
        "--pag",
        "3.0",
        "--plugin",
        '{"type": "PerturbedAttention", "heads": ["transformer_blocks.1.attn:0"]}',
    ]
    assert main(argv) == 0
    assert set(table(capsys.readouterr().out)) == {"plain", "PerturbedAttention (heads)", "PerturbedAttention (layers)"}


def test_random_weights_from_a_config_folder(tmp_path, capsys):
    from attnsurgery.testing import tiny_sdxl

    source = tiny_sdxl()
    source.save_config(tmp_path)
    source.unet.save_config(tmp_path / "unet")
    argv = ["bench", "--model", str(tmp_path), "--random-weights", "--height", "64", "--width", "64", *FAST]
    assert main(argv) == 0
    assert "plain" in table(capsys.readouterr().out)


def test_compile_adds_compiled_rows_with_their_compile_time(capsys):
    """The eager backend traces with dynamo (graph breaks and all) without generating code: seconds on a CPU."""
    argv = ["bench", "--model", "tiny-flux", "--height", "64", "--width", "64", *FAST, "--compile", "eager"]
    assert main(argv) == 0
    rows = table(capsys.readouterr().out)
    assert rows["plain"][0] == "no" and rows["plain"][-1] == "-"
    compiled = rows["plain + compile"]
    assert compiled[0] == "yes" and compiled[2] == "1.00x" and float(compiled[-1]) >= 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "sdxxl"], "unknown model 'sdxxl'; use a named shape (sd15, sd21, sdxl"),
        (["--model", "tiny-sd15", "--dtype", "fp16"], "fp16 on the CPU"),
        (["--model", "tiny-sd15", "--na"], "row 'NeighborhoodAttention': NeighborhoodAttention is for DiTs"),
        (["--model", "tiny-sd3", "--hidiffusion"], "row 'HiDiffusion': HiDiffusion supports SD1.x, SD2.x and SDXL"),
        (["--model", "tiny-sd15", "--tome", "1.5"], "ratio"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    assert main(["bench", "--height", "64", "--width", "64", *FAST, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnsurgery bench: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cuda_without_cuda_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["bench", "--model", "tiny-sd15", "--height", "64", "--width", "64", "--device", "cuda"]
    assert main(argv) == 2
    assert "device 'cuda': torch" in capsys.readouterr().err


def test_an_unknown_dtype_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--height", "64", "--width", "64", "--dtype", "fp8"])
    assert stop.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
