import dataclasses

import pytest
import torch

import attnsurgery as surg
from attnsurgery.processors.base import WrappingProcessor
from attnsurgery.testing import snapshot
from tests.support.pipes import run_pipe
from tests.support.plugins import Everything, Recorder

state_of = snapshot


def test_apply_changes_output_and_remove_restores_everything(sd15):
    before = run_pipe(sd15)
    before_state = state_of(sd15)
    for _ in range(3):  # repeated cycles
        handle = surg.apply(sd15, Everything())
        changed = run_pipe(sd15)
        assert (changed - before).abs().max() > 1e-3, "the test plugin must change the output"
        assert sd15.unet.attnsurgery_marker == "added"
        handle.remove()
        assert state_of(sd15) == before_state
        assert torch.equal(run_pipe(sd15), before)
    assert not hasattr(sd15.unet, "attnsurgery_marker")


@pytest.mark.parametrize("name", ["sd35", "flux"])
def test_dits_restore_exactly(name, request):
    pipe = request.getfixturevalue(name)
    before = run_pipe(pipe)  # first: transformers installs its own output-capturing hooks on a first call
    before_state = state_of(pipe)
    with surg.patched(pipe, Everything(layers="all")):
        assert (run_pipe(pipe) - before).abs().max() > 1e-3
    assert state_of(pipe) == before_state
    assert torch.equal(run_pipe(pipe), before)


def test_exception_mid_generation_still_restores(sd15):
    before = run_pipe(sd15, steps=3)
    before_state = state_of(sd15)
    with pytest.raises(RuntimeError, match="injected failure"):
        with surg.patched(sd15, Everything(fail_at_step=1)):
            run_pipe(sd15, steps=3)
    assert state_of(sd15) == before_state
    assert torch.equal(run_pipe(sd15, steps=3), before)
    assert surg.active_surgeries(sd15) == []


def test_handle_reports_its_sites(sd15):
    with surg.patched(sd15, Everything()) as handle:
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in handle.sites
        assert "conv_in" in handle.sites
        assert "Everything" in repr(handle) and "active" in repr(handle)
    assert "removed" in repr(handle)
    handle.remove()  # idempotent


def test_stacking_and_remove_order(sd15):
    before = run_pipe(sd15)
    first = surg.apply(sd15, Everything(layers="down", role="tokens"))
    one = run_pipe(sd15)
    second = surg.apply(sd15.unet, Recorder())  # the bare denoiser of the same pipeline
    assert surg.active_surgeries(sd15) == [first, second]
    with pytest.raises(RuntimeError, match="applied later to this denoiser are still active"):
        first.remove()
    assert torch.equal(run_pipe(sd15), one)  # the failed remove changed nothing
    assert surg.remove(sd15) == 2
    assert torch.equal(run_pipe(sd15), before)


def test_conflicting_claims_fail_at_apply_and_leave_nothing(sd15):
    before_state = state_of(sd15)
    with pytest.raises(ValueError, match="conflict at down_blocks.0.attentions.0.transformer_blocks.0.attn1"):
        surg.apply(sd15, Everything(layers="top", role="tokens"), Everything(layers="down", role="tokens"))
    assert state_of(sd15) == before_state
    # stacked across surgeries too; compatible roles stack
    handle = surg.apply(sd15, Everything(layers="top", role="tokens"))
    with pytest.raises(ValueError, match="an earlier surgery already changes it as 'tokens'"):
        surg.apply(sd15, Recorder(), Everything(layers="top", role="tokens"))
    assert surg.active_surgeries(sd15) == [handle]
    handle.remove()
    assert state_of(sd15) == before_state


def test_bad_targets_and_plugins_are_named(sd15):
    with pytest.raises(TypeError, match=r"pass a plugin instance, e.g. Recorder\(\)"):
        surg.apply(sd15, Recorder)
    with pytest.raises(TypeError, match="is not an attnsurgery plugin"):
        surg.apply(sd15, "hidiffusion")
    with pytest.raises(NotImplementedError, match="cannot operate on str"):
        surg.apply("runwayml/stable-diffusion-v1-5")
    with pytest.raises(ValueError, match="unknown role 'nonsense'"):
        surg.apply(sd15, Everything(role="nonsense"))


def test_module_processors_are_restored_into_modules(sd15):
    class ModuleProcessor(torch.nn.Module):  # like IP-Adapter's processors, which hold weights
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.scale = torch.nn.Parameter(torch.ones(()))

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return self.scale * self.inner(attn, hidden_states, *args, **kwargs)

    attn = sd15.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    attn.set_processor(ModuleProcessor(attn.processor))
    original = attn.processor
    keys = set(attn.state_dict())
    with surg.patched(sd15, Everything(layers="mid")):
        assert "processor" not in attn._modules and isinstance(attn.processor, WrappingProcessor)
    assert attn._modules["processor"] is original and "processor" not in vars(attn)
    assert set(attn.state_dict()) == keys


def test_wrapper_keeps_extra_keyword_arguments_flowing(sd15, caplog):
    seen = []

    class KeywordProcessor:
        def __init__(self, inner):
            self.inner = inner

        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, my_scale=1.0
        ):
            seen.append(my_scale)
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    attn = sd15.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    attn.set_processor(KeywordProcessor(attn.processor))
    with surg.patched(sd15, Everything(layers="mid")):
        attn(torch.randn(1, 4, 64), my_scale=0.25)
    assert seen == [0.25]
    assert "are not expected" not in caplog.text


def test_private_generators_leave_the_global_rng_alone(sd15):
    handle = surg.apply(sd15)
    state = torch.random.get_rng_state()
    a = torch.rand(3, generator=handle.generator("layer", 3))
    b = torch.rand(3, generator=handle.generator("layer", 3))
    c = torch.rand(3, generator=handle.generator("layer", 4))
    d = torch.rand(3, generator=handle.generator("layer", 3, seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    handle.remove()


def test_removed_surgery_cannot_be_reused(sd15):
    handle = surg.apply(sd15)
    handle.remove()
    with pytest.raises(RuntimeError, match="was removed"):
        handle.set_attr(sd15.unet, "x", 1)


def test_plugin_configs_round_trip():
    plugin = Everything(layers="mid", role="tokens", fail_at_step=2)
    data = plugin.to_dict()
    assert data == {"type": "Everything", "layers": "mid", "role": "tokens", "fail_at_step": 2}
    assert surg.plugin_from_dict(data) == plugin
    with pytest.raises(ValueError, match=r"Everything has no field\(s\) \['colour'\]"):
        Everything.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match="unknown plugin type 'Nope'"):
        surg.plugin_from_dict({"type": "Nope"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plugin.layers = "top"


def test_a_text_encoder_is_refused_by_name(sd15):
    """A transformers model has a `config` too, but not a diffusers one: say what to pass instead."""
    with pytest.raises(NotImplementedError, match="CLIPTextModel is not a diffusers denoiser.*pipe.unet"):
        surg.apply(sd15.text_encoder, surg.PerturbedAttention())
    assert not surg.active_surgeries(sd15)
