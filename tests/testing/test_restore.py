"""The public exact-restore check catches what a careless plugin leaves behind, and passes after remove()."""

import pytest
import torch

import attnsurgery as surg
from attnsurgery.testing import assert_restored, snapshot, tiny_sd15
from tests.support.plugins import Everything


def test_a_restored_pipeline_passes():
    pipe = tiny_sd15()
    before = snapshot(pipe)
    with surg.patched(pipe, Everything()):
        with pytest.raises(AssertionError):  # while patched, the check sees the changes
            assert_restored(pipe, before)
    assert_restored(pipe, before)


def test_a_left_over_processor_is_named():
    pipe = tiny_sd15()
    before = snapshot(pipe)
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.processor = type(attn.processor)()
    with pytest.raises(
        AssertionError,
        match=r"unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1: "
        r"(dict|processor) not restored",
    ):
        assert_restored(pipe, before)


def test_a_left_over_hook_and_a_bare_denoiser():
    unet = tiny_sd15().unet
    before = snapshot(unet)
    hook = unet.conv_in.register_forward_hook(lambda *args: None)
    with pytest.raises(AssertionError, match="denoiser:conv_in: hooks not restored"):
        assert_restored(unet, before)
    hook.remove()
    assert_restored(unet, before)
    unet.conv_in.extra = torch.nn.Identity()
    with pytest.raises(AssertionError, match="modules not restored: added"):
        assert_restored(unet, before)
