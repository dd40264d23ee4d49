"""The timing core of ``attnsurgery bench`` and the GPU suite: warm-up kept out, steps summed, ratios, skipped
and failing rows, devices and dtypes, and the published shapes the random-weight pipelines are built from."""

from __future__ import annotations

import json
import time
import types

import pytest
import torch

import attnsurgery as surg
from attnsurgery.families import detect_family
from attnsurgery.pipelines.bench import BenchError, BenchRow, bench_device, bench_dtype, benchmark
from attnsurgery.pipelines.bench_report import BenchReport, RowResult, Spread, format_table
from attnsurgery.pipelines.loading import meta_module
from attnsurgery.pipelines.model_shapes import SHAPES, prompt_inputs, random_pipeline
from attnsurgery.testing import tiny_sd15
from tests.support.benchmarks import run_benchmark

torch.set_num_threads(1)


class CountingDenoiser(torch.nn.Module):
    """Sleeps ``warm_s`` per call during the first pipeline call (a warm-up's one-time costs), ``step_s`` later."""

    def __init__(self, warm_s: float, step_s: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.warm_s, self.step_s = warm_s, step_s
        self.calls, self.pipeline_calls = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.warm_s if self.pipeline_calls == 1 else self.step_s)
        return x


class FakePipeline:
    """Calls its denoiser ``calls_per_step`` times per step, as FLUX's true CFG does twice."""

    def __init__(self, denoiser: torch.nn.Module, calls_per_step: int = 1) -> None:
        self.unet = denoiser
        self.calls_per_step = calls_per_step
        self.scheduler = types.SimpleNamespace(timesteps=None)

    def __call__(self, num_inference_steps: int, height: int, width: int, generator: torch.Generator) -> None:
        self.unet.pipeline_calls += 1
        self.scheduler.timesteps = torch.arange(num_inference_steps)
        for _ in range(num_inference_steps * self.calls_per_step):
            self.unet(torch.zeros(1))


def fake_benchmark(pipe, rows=(), **kwargs):
    settings = {"height": 8, "width": 8, "steps": 3, "repeats": 2, "warmup": 1, "inputs": {}, "progress": False}
    return benchmark(pipe, list(rows), **{**settings, **kwargs})


def test_warmup_calls_are_run_but_not_timed():
    denoiser = CountingDenoiser(warm_s=0.2, step_s=0.0)
    report = fake_benchmark(FakePipeline(denoiser))
    assert denoiser.calls == (1 + 2) * 3  # one warm-up image and two timed ones, three steps each
    [row] = report.rows
    assert row.plain and row.steps == 3 and len(row.step_s.values) == 2
    assert row.step_s.median < 0.1, "the 0.2 s warm-up calls leaked into the timed steps"
    assert row.warmup_s >= 3 * 0.2


def test_a_step_sums_every_denoiser_call_of_the_step():
    report = fake_benchmark(FakePipeline(CountingDenoiser(warm_s=0.0, step_s=0.02), calls_per_step=2))
    step = report.rows[0].step_s
    assert step.low >= 2 * 0.02
    assert step.low <= step.median <= step.high
    assert report.rows[0].image_s.median >= 3 * step.low


def test_plain_rows_are_added_and_skipped_rows_listed():
    pipe = FakePipeline(CountingDenoiser(0.0, 0.0))
    report = fake_benchmark(pipe, [BenchRow("neighborhood attention", skip="not built")])
    assert [(row.label, row.skipped) for row in report.rows] == [
        ("plain", None),
        ("neighborhood attention", "not built"),
    ]
    late = fake_benchmark(pipe, [BenchRow("plain")], deadline=time.perf_counter() - 1)
    assert late.rows[0].skipped == "skipped: time budget"


def test_a_failing_row_is_named_or_recorded():
    pipe = tiny_sd15()
    rows = [BenchRow("ToMe on a missing layer", (surg.TokenMerging(layers="no_such_block"),))]
    with pytest.raises(BenchError, match="row 'ToMe on a missing layer': .*no_such_block"):
        benchmark(pipe, rows, height=64, width=64, steps=1, repeats=1, progress=False)
    report = benchmark(pipe, rows, height=64, width=64, steps=1, repeats=1, progress=False, keep_going=True)
    assert report.rows[0].step_s is not None
    assert report.rows[1].skipped.startswith("failed: ") and report.rows[1].step_s is None


def _row(label, step, image, peak=None, plain=False, compile=False):
    return RowResult(label, plain, compile, step_s=Spread.of([step]), image_s=Spread.of([image]), peak_bytes=peak)


def test_ratios_are_against_plain_with_the_same_compile_setting():
    rows = (
        _row("plain", 0.2, 2.0, 100, plain=True),
        _row("fast", 0.1, 1.6, 50),
        _row("plain + compile", 0.1, 1.0, plain=True, compile=True),
        _row("fast + compile", 0.05, 0.8, compile=True),
    )
    report = BenchReport("m", 64, 64, 2, 1, 1, "cuda", "GPU", "bfloat16", "today", {}, rows)
    assert report.ratios(rows[1]) == {"step_speedup": 2.0, "image_speedup": 1.25, "memory_ratio": 0.5}
    assert report.ratios(rows[3])["step_speedup"] == 2.0
    assert report.to_dict()["rows"][1]["step_speedup"] == 2.0
    table = format_table(report)
    assert "fast + compile" in table and "2.00x" in table and "| fast |" in format_table(report, markdown=True)


def test_missing_cuda_and_bad_dtypes_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda'.*cpu"):
        bench_device("cuda")
    with pytest.raises(ValueError, match="cuda or cpu"):
        bench_device("meta")
    assert bench_device(None) == torch.device("cpu")
    cpu = torch.device("cpu")
    assert bench_dtype(None, cpu) == torch.float32 and bench_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 on the CPU"):
        bench_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        bench_dtype("fp8", cpu)


@pytest.mark.parametrize(
    ("name", "family", "parameters"),
    [
        ("sd15", "sd15", 859_520_964),
        ("sdxl", "sdxl", 2_567_463_684),
        ("flux-dev", "flux", 11_901_408_320),
        ("sd35-medium", "sd35", None),
        ("sd3-medium", "sd3", None),
    ],
)
def test_named_shapes_are_the_published_architectures(name, family, parameters):
    """Built on the meta device: the published parameter counts, and the family every preset keys on."""
    shape = SHAPES[name]
    denoiser = meta_module(shape.denoiser, shape.denoiser_config)
    assert detect_family(denoiser).name == family
    if parameters is not None:
        assert sum(p.numel() for p in denoiser.parameters()) == parameters


def test_a_config_folder_builds_with_random_weights_and_no_text_encoders(tmp_path):
    source = tiny_sd15()
    source.save_config(tmp_path)
    for name in ("unet", "vae"):
        getattr(source, name).save_config(tmp_path / name)
    pipe = random_pipeline(tmp_path, dtype="bf16")
    assert pipe.text_encoder is None and pipe.unet.dtype == torch.bfloat16
    assert list(pipe.unet.config.block_out_channels) == list(source.unet.config.block_out_channels)
    inputs = prompt_inputs(pipe)
    assert inputs["prompt_embeds"].shape == (1, 77, source.unet.config.cross_attention_dim)
    assert torch.isfinite(pipe.unet.conv_in.weight.float()).all()
    with pytest.raises(ValueError, match="unknown model shape 'sd99'.*sd15"):
        random_pipeline("sd99")


@pytest.mark.slow
def test_the_gpu_suite_runs_on_the_cpu_with_tiny_shapes(tmp_path):
    """``benchmarks/gpu_suite.py --smoke``: every case and row of the GPU run, through the same code, in tens of
    seconds; peers and plugins all measured, one compiled row traced."""
    run_benchmark("gpu_suite.py", "--smoke", "--out", str(tmp_path), "--no-progress", timeout=600)
    record = json.loads((tmp_path / "gpu_suite.json").read_text())
    cases = {case["model"].split(" (")[0]: case["rows"] for case in record["cases"]}
    assert set(cases) == {
        f"{model} {size}^2"
        for model, size in (
            ("sd15", 1024),
            ("sdxl", 1024),
            ("sd15", 2048),
            ("sdxl", 2048),
            ("sd35-medium", 2048),
            ("flux-dev", 2048),
            ("sd35-medium", 4096),
            ("flux-dev", 4096),
        )
    }
    reasons = [row["skipped"] for case in cases.values() for row in case if row["skipped"]]
    assert not [reason for reason in reasons if not reason.startswith("diffusers has no")]
    unet = {row["label"] for row in cases["sdxl 2048^2"]}
    assert {"hidiffusion package", "tomesd 0.5", "diffusers PAG pipeline", "ConvFusion (random blocks)"} <= unet
    flux = {row["label"]: row["skipped"] for row in cases["flux-dev 4096^2"]}
    dit_rows = ("ToMe 0.5 (qkv)", "ToMe 0.5 (kv)", "AgentAttention", "NeighborhoodAttention (native window)")
    assert all(flux[label] is None for label in ("PAG layers", *dit_rows))
    assert any(row["compile"] and row["step_s"] for row in cases["sd15 1024^2"])
    assert "| plain |" in (tmp_path / "gpu_suite.md").read_text()


def test_the_cuda_path_pairs_events_and_reads_the_peak_of_the_loop(monkeypatch):
    """No GPU here: CUDA's events and allocator counters are faked to check how the probe uses them."""
    from attnsurgery.pipelines import bench

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self, stream) -> None:
            self.at = time.perf_counter()

        def elapsed_time(self, end: FakeEvent) -> float:
            return (end.at - self.at) * 1e3

    peaks, resets = iter(range(100, 10_000, 100)), []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    denoiser = CountingDenoiser(warm_s=0.01, step_s=0.01)
    pipe = FakePipeline(denoiser)
    probe = bench._Probe(denoiser, torch.device("cuda"))
    run = bench._timed_call(lambda: pipe(num_inference_steps=3, height=8, width=8, generator=None), probe)
    assert run.denoiser_s >= 3 * 0.01 and run.image_s >= run.denoiser_s
    assert len(resets) == 2  # before the call, and when the denoising loop starts
    assert run.peak == 400  # read after each of the 3 steps (the first read, 100, was the text encoders' peak)
    assert run.peak_image == 500  # the whole call: the later of the loop's and the decoder's peak
