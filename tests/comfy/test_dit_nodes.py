"""The DiT nodes (perturbed attention, neighborhood attention, token merging, agent attention) on ComfyUI's FLUX
and SD3 vs the diffusers plugins.

The tiny ComfyUI models are loaded from their diffusers twins' state dicts by ComfyUI itself; each parity test
first shows that the node changes the prediction, then that the twin with the plugin gives the same one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import attnsurgery as surg
from attnsurgery.comfy.agent_attention import DEFAULT_SCHEDULE, AttnSurgeryAgentAttention
from attnsurgery.comfy.neighborhood_attention import AttnSurgeryNeighborhoodAttention
from attnsurgery.comfy.perturbed_attention import AttnSurgeryPerturbedAttention
from attnsurgery.comfy.token_merging import AttnSurgeryTokenMerging
from tests.support.comfy import tiny_dit
from tests.support.comfy.tiny_comfy import sample

# a head of a joint block and one of a single-stream block (SD3: of the second joint block; SD3.5: first the
# image-only attn2 of its dual block)
HEADS = {
    "flux": ["transformer_blocks.0.attn:1", "single_transformer_blocks.1.attn:0"],
    "sd3": ["transformer_blocks.0.attn:1", "transformer_blocks.1.attn:0"],
    "sd35": ["transformer_blocks.0.attn2:1", "transformer_blocks.1.attn:0"],
}
ATOL = 2e-5  # float32 rounding of x - sigma * v (|x| ~ 4): 5e-7 to 3e-6 apart
# merging and agents move the prediction little on random weights (SD3's attention is nearly uniform: ~2e-3)
MERGE_EFFECT = 1e-3


@pytest.fixture(scope="module", params=["flux", "sd3", "sd35"])
def dit(request, comfyui):
    if not comfyui.modern:
        pytest.skip("ComfyUI of March 2024 has no FLUX or SD3 models (the nodes refuse there, see below)")
    tiny = tiny_dit.build(request.param)
    tiny.plain = tiny_dit.first_call(tiny, tiny.model)
    return tiny


def _pag(model, heads, kind="identity", joint="full"):
    return AttnSurgeryPerturbedAttention().patch(model, 3.0, heads, 1.0, kind, 2.0, 0.0, 1.0, joint)[0]


def _na(model, layers="all", window=3, force=True, start=0.0, end=1.0):
    return AttnSurgeryNeighborhoodAttention().patch(model, layers, window, 1, 1, start, end, "tiles", force)[0]


def test_the_plain_models_agree(dit):
    # the velocity must move the prediction off the input, or x - sigma * v agrees for any two models
    assert (dit.plain["cond_denoised"] - dit.plain["input"]).abs().max() > 0.05
    assert torch.allclose(tiny_dit.twin_prediction(dit, dit.plain), dit.plain["cond_denoised"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("joint", ["full", "image_only"])
def test_perturbed_attention_matches_the_plugin(dit, joint):
    heads = HEADS[dit.family]
    call = tiny_dit.first_call(dit, _pag(dit.model, " ".join(heads), joint=joint))
    assert (call["denoised"] - call["cond_denoised"]).abs().max() > 0.05  # the guidance term (0.1-0.25 here)
    assert torch.allclose(tiny_dit.twin_prediction(dit, call), call["cond_denoised"], rtol=0, atol=ATOL)
    plugin = surg.PerturbedAttention(scale=3.0, heads=heads, mode="sequential", joint=joint)
    assert torch.allclose(tiny_dit.twin_prediction(dit, call, plugin), call["denoised"], rtol=0, atol=ATOL)


def test_neighborhood_attention_matches_the_plugin(dit):
    call = tiny_dit.first_call(dit, _na(dit.model))
    assert (call["cond_denoised"] - dit.plain["cond_denoised"]).abs().max() > 0.01  # 0.04-0.06 here
    plugin = surg.NeighborhoodAttention(window=3, force=True, backend="tiles")
    assert torch.allclose(tiny_dit.twin_prediction(dit, call, plugin), call["cond_denoised"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["qkv", "kv"])
def test_token_merging_matches_the_plugin(dit, mode):
    """Seed -1 (each cell's first dst) on both sides: the same matching, so the same merged attention."""
    call = tiny_dit.first_call(dit, AttnSurgeryTokenMerging().patch(dit.model, 0.5, 2, 2, "all", -1, mode)[0])
    assert (call["cond_denoised"] - dit.plain["cond_denoised"]).abs().max() > MERGE_EFFECT
    plugin = surg.TokenMerging(ratio=0.5, use_rand=False, mode=mode)
    assert torch.allclose(tiny_dit.twin_prediction(dit, call, plugin), call["cond_denoised"], rtol=0, atol=ATOL)


def test_a_seed_draws_reproducible_dst_positions(dit):
    """With CFG (an even batch: ToMe draws dst positions only there) the seed picks them, reproducibly."""

    def merged(seed: int) -> torch.Tensor:
        node = AttnSurgeryTokenMerging().patch(dit.model, 0.5, 2, 2, "all", seed, "qkv")[0]
        size, channels = tiny_dit.LATENT_SIZE, tiny_dit.CHANNELS
        return sample(node, dit.positive, dit.negative, steps=1, cfg=2.0, size=size, channels=channels)

    first = merged(-1)
    assert (merged(0) - first).abs().max() > MERGE_EFFECT / 10
    assert torch.equal(merged(0), merged(0))


@pytest.mark.parametrize("source", ["tome", "pool"])
def test_agent_attention_matches_the_plugin(dit, source):
    """AgentSD's published phases; the first step is in the agents' phase on both clocks."""
    node = AttnSurgeryAgentAttention().patch(dit.model, "all", DEFAULT_SCHEDULE, source, 0.3, 0.075, -1)[0]
    call = tiny_dit.first_call(dit, node)
    assert (call["cond_denoised"] - dit.plain["cond_denoised"]).abs().max() > MERGE_EFFECT
    plugin = surg.AgentAttention(agent_source=source, use_rand=False)
    assert torch.allclose(tiny_dit.twin_prediction(dit, call, plugin), call["cond_denoised"], rtol=0, atol=ATOL)


def test_perturbation_edits_the_neighborhood_result(dit):
    """Both nodes on one block: the perturbation edits the local attention, as the two plugins stacked do."""
    heads = HEADS[dit.family][:1]
    call = tiny_dit.first_call(dit, _pag(_na(dit.model, layers="transformer_blocks.0"), heads[0]))
    pag_alone = tiny_dit.first_call(dit, _pag(dit.model, heads[0]))
    assert (call["cond_denoised"] - dit.plain["cond_denoised"]).abs().max() > 0.01  # neighborhood acts
    assert (call["denoised"] - call["cond_denoised"]).abs().max() > 0.05  # the perturbation acts
    # and it perturbs the local attention, not the plain one
    assert (call["denoised"] - pag_alone["denoised"]).abs().max() > 0.01
    plugins = (
        surg.NeighborhoodAttention(window=3, force=True, layers="transformer_blocks.0", backend="tiles"),
        surg.PerturbedAttention(scale=3.0, heads=heads, mode="sequential"),
    )
    assert torch.allclose(tiny_dit.twin_prediction(dit, call, *plugins), call["denoised"], rtol=0, atol=ATOL)


def test_idle_settings_are_bit_identical_and_the_input_model_untouched(dit):
    """At native size without force, or outside its percent window, the node leaves every call alone."""
    active = _na(dit.model)
    assert "dit" in active.model_options["transformer_options"]["patches_replace"]  # what the input must lack
    assert not torch.equal(tiny_dit.first_call(dit, active)["cond_denoised"], dit.plain["cond_denoised"])
    for idle in (_na(dit.model, force=False), _na(dit.model, start=0.5)):
        assert torch.equal(tiny_dit.first_call(dit, idle)["cond_denoised"], dit.plain["cond_denoised"])
    assert "dit" not in dit.model.model_options["transformer_options"].get("patches_replace", {})
    assert torch.equal(tiny_dit.first_call(dit, dit.model)["cond_denoised"], dit.plain["cond_denoised"])


def test_dit_selectors_and_their_errors(dit):
    with pytest.raises(ValueError, match=r"matches no attention layer(.|\n)*transformer_blocks.1.attn  \(joint"):
        _pag(dit.model, "mid_block")
    with pytest.raises(ValueError, match="heads 0..1"):
        _pag(dit.model, "transformer_blocks.0.attn:2")
    with pytest.raises(ValueError, match="U-Net"):
        _na(SimpleNamespace(model=SimpleNamespace(diffusion_model=SimpleNamespace(input_blocks=[]))))
    if dit.family == "flux":
        patched = _na(dit.model, layers="single")
        with pytest.raises(ValueError, match="would both change the tokens"):
            _na(patched, layers="single_transformer_blocks.0")


def test_dit_nodes_refuse_other_models_and_older_comfyui(comfyui):
    """The 2024 snapshot has neither the attention override nor DiT block patches: the refusal names 0.20.1."""
    other = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1)))
    match = "FLUX \\(Flux\\) and SD3" if comfyui.modern else "update ComfyUI to 0.20.1 or newer"
    with pytest.raises(NotImplementedError, match=match):
        _pag(other, "all")
    with pytest.raises(NotImplementedError, match=match):
        _na(other)
    with pytest.raises(NotImplementedError, match=match):
        AttnSurgeryTokenMerging().patch(other, 0.5, 2, 2, "all", 0, "kv")
    with pytest.raises(NotImplementedError, match=match):
        AttnSurgeryAgentAttention().patch(other, "all", DEFAULT_SCHEDULE, "tome", 0.3, 0.075, 0)


def test_an_attention_override_in_the_options_sees_every_call(dit):
    """Another node's ``optimized_attention_override`` stays in every call: the perturbed pass runs ComfyUI's
    attention through it, and neighborhood attention hands it its own function in place of ComfyUI's."""
    record = []

    def override(function, *args, **kwargs):
        record.append(function.__module__)
        return function(*args, **kwargs)

    def calls(model) -> list[str]:
        record.clear()
        model.model_options["transformer_options"]["optimized_attention_override"] = override
        tiny_dit.first_call(dit, model)
        return list(record)

    plain = calls(dit.model.clone())
    assert plain and set(plain) == {"comfy.ldm.modules.attention"}
    assert calls(_pag(dit.model, "all")) == plain * 2  # every step: the conditional and the perturbed pass
    assert calls(_na(dit.model)) == ["attnsurgery.comfy.dit"] * len(plain)
