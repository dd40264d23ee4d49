import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

import attnsurgery as surg
from attnsurgery.context import StepContext, locate_timestep, make_clock_hook
from attnsurgery.families import detect_family
from attnsurgery.testing import tiny
from tests.support.pipes import run_pipe
from tests.support.plugins import Recorder


def indices(log):
    return [(entry["step_index"], entry["num_steps"]) for entry in log]


def test_ddim_steps_and_progress(sd15):
    recorder = Recorder()
    with surg.patched(sd15, recorder):
        run_pipe(sd15, steps=5)
    assert indices(recorder.log) == [(i, 5) for i in range(5)]
    assert [e["progress"] for e in recorder.log] == [i / 5 for i in range(5)]
    assert all(e["batch_size"] == 2 and e["latent_hw"] == (8, 8) for e in recorder.log)  # CFG doubles the batch


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_euler_and_dpmpp_on_sd15(sd15, scheduler_cls):
    sd15.scheduler = scheduler_cls.from_config(sd15.scheduler.config)  # swapped after apply: read at call time
    recorder = Recorder()
    with surg.patched(sd15, recorder):
        run_pipe(sd15, steps=4, size=(64, 96))
    assert indices(recorder.log) == [(i, 4) for i in range(4)]
    assert recorder.log[0]["latent_hw"] == (8, 12)


def test_sdxl_euler(sdxl):
    recorder = Recorder()
    with surg.patched(sdxl, recorder):
        run_pipe(sdxl, steps=3)
    assert indices(recorder.log) == [(i, 3) for i in range(3)]


@pytest.mark.parametrize("name", ["sd3", "flux", "flux2", "qwenimage", "zimage", "chroma"])
def test_flow_matching(name, request):
    """The pipelines pass t, t / 1000 or (Z-Image) 1 - t / 1000; the latent grid comes from the packed img_ids
    (FLUX-likes), img_shapes (Qwen-Image) or the per-row latent list (Z-Image). Chroma's CFG is a second call
    per step, SD3's and Z-Image's a batch of two."""
    pipe = request.getfixturevalue(name)
    recorder = Recorder()
    with surg.patched(pipe, recorder):
        run_pipe(pipe, steps=3, size=(64, 96))
    calls = 2 if name == "chroma" else 1
    assert indices(recorder.log) == [(i, 3) for i in range(3) for _ in range(calls)]
    assert [e["progress"] for e in recorder.log[::calls]] == [0.0, 1 / 3, 2 / 3]
    batch = 2 if name in ("sd3", "zimage") else 1
    assert all(e["latent_hw"] == (8, 12) and e["batch_size"] == batch for e in recorder.log)


def test_img2img_with_strength_starts_midway(sd15):
    img2img = StableDiffusionImg2ImgPipeline(**sd15.components)
    img2img.set_progress_bar_config(disable=True)
    recorder = Recorder()
    image = torch.rand(1, 3, 64, 64)
    with surg.patched(img2img, recorder):
        img2img(
            "a red circle",
            image=image,
            strength=0.5,
            num_inference_steps=10,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
    assert indices(recorder.log) == [(i, 10) for i in range(5, 10)]
    assert recorder.log[0]["progress"] == 0.5


def test_interrupted_run_then_a_different_step_count(sd15):
    recorder = Recorder()

    def interrupt(pipe, step, timestep, callback_kwargs):
        if step == 1:
            pipe._interrupt = True
        return callback_kwargs

    with surg.patched(sd15, recorder):
        run_pipe(sd15, steps=6, callback_on_step_end=interrupt)
        assert indices(recorder.log) == [(0, 6), (1, 6)]
        recorder.log.clear()
        run_pipe(sd15, steps=3)
    assert indices(recorder.log) == [(0, 3), (1, 3), (2, 3)]


def test_bare_denoiser_called_with_keywords_uses_the_fallback(sd15):
    unet = sd15.unet
    recorder = Recorder()
    with surg.patched(unet, recorder):
        for t in (999, 500):  # two calls at one timestep would read the same clock: no counters
            text = torch.randn(1, 5, 32)
            unet(sample=torch.randn(1, 4, 8, 12), timestep=torch.tensor([t]), encoder_hidden_states=text)
            unet(torch.randn(1, 4, 8, 12), t, torch.randn(1, 5, 32))
    assert [e["step_index"] for e in recorder.log] == [None] * 4
    assert [round(e["progress"], 3) for e in recorder.log] == [0.001, 0.001, 0.5, 0.5]
    assert recorder.log[0]["latent_hw"] == (8, 12)


def test_locate_timestep_tolerates_half_precision_and_flux_scale():
    schedule = torch.linspace(999, 0, 20)
    half = float(schedule[3].half())
    assert locate_timestep(half, schedule) == (3, 20)
    assert locate_timestep(float(schedule[7]) / 1000, schedule) == (7, 20)
    assert locate_timestep(1234.0, schedule) is None
    heun = torch.tensor([999.0, 800.0, 800.0, 500.0, 500.0, 100.0])  # second-order schedulers repeat steps
    assert locate_timestep(500.0, heun) == (2, 4)


def test_grids_and_first_fraction_rule():
    family = detect_family(tiny.tiny_sd15().unet)
    context = StepContext(family, latent_hw=(9, 13), step_index=7, num_steps=25)
    assert context.grid_for(9 * 13) == (9, 13)
    assert context.grid_for(5 * 7) == (5, 7)  # ceil halving, as stride-2 convs do
    assert context.image_hw == (72, 104)
    assert context.in_first(0.3) is False  # HiDiffusion's rule: active while step < floor(25 * 0.3) = 7
    assert context.in_first(0.32) is True  # floor(25 * 0.32) = 8
    bare = StepContext(family, progress=0.35)
    assert bare.in_first(0.4) and not bare.in_first(0.3)


def _flux_dev_schedule(steps: int = 50, side_px: int = 2048):
    """FLUX.1-dev's shifted flow schedule at ``side_px`` (FluxPipeline's mu for that many image tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    mu = calculate_shift((side_px // 16) ** 2, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(steps, mu=mu)
    return scheduler


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("side_px", "steps"), [(512, 28), (1024, 50), (2048, 50), (4096, 100)])
def test_the_clock_places_every_half_precision_step_of_a_shifted_schedule(dtype, side_px, steps):
    """Issue case: FLUX-dev at 2048 px in bf16 puts many steps within one bf16 ulp of each other. The
    pipeline's scheduler knows its step index (after the first step), and the clock takes it when the
    received timestep agrees with it; so every step lands on its index, each CFG call of a step too, at
    any size (the shift grows with it)."""
    pipe = tiny.tiny_flux()
    pipe.scheduler = _flux_dev_schedule(steps, side_px)
    handle = surg.apply(pipe.transformer, seed=0)
    hook = make_clock_hook(handle.context, pipe.transformer, lambda: pipe.scheduler)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    call = {"hidden_states": torch.zeros(1, 64, 4), "img_ids": ids.reshape(-1, 3)}
    placed = []
    for index, t in enumerate(pipe.scheduler.timesteps):
        pipe.scheduler._step_index = index if index else None  # what step() leaves for the next call
        received = (t.expand(1).to(dtype) / 1000).to(dtype)
        for _ in range(2):  # true CFG: the conditional and the unconditional call of one step
            hook(pipe.transformer, (), {**call, "timestep": received})
            placed.append(handle.context.step_index)
    handle.remove()
    assert placed == [i for i in range(steps) for _ in range(2)]
