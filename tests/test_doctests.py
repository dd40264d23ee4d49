"""The package's docstring examples, run as tests: one test per docstring that holds ``>>>`` examples.

Collection: every module of ``attnsurgery`` (the package itself and ``pkgutil.walk_packages`` over it, but
not the ``__main__`` entry points: importing those runs the CLI) goes through ``doctest.DocTestFinder``.
``attnsurgery.comfy`` imports ComfyUI only inside functions, so it is searched like the rest.

Each docstring runs in a fresh temporary folder (examples that write ``heads.json`` write it there) with its
module's globals, the usual short names (``torch``, ``np``, ``F``, ``Path``, ``surg``, ``attnsurgery``) and,
built only for the docstrings that mention them, cheap offline stand-ins for what the examples leave
undefined: ``pipe`` is a tiny random-weight SD1.5 pipeline (``attnsurgery.testing``) whose native and
default size is 64 px, so a call at the default 50 steps takes about a second; ``SPECIAL`` gives a few
docstrings another stand-in (an SDXL ``pipe`` where the output names the family, ...) or the file an
example reads. Examples that cannot run offline in seconds (hub or trained weights, a real-size image,
ComfyUI) carry ``# doctest: +SKIP`` in the docstring itself; a docstring whose examples are all skipped
is reported as a skipped test.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

import attnsurgery
from attnsurgery.testing import tiny
from tests.support.plugins import Everything

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.FAIL_FAST


def modules() -> list[Any]:
    names = [info.name for info in pkgutil.walk_packages(attnsurgery.__path__, "attnsurgery.")]
    names = [name for name in names if not name.endswith(".__main__")]
    return [attnsurgery, *(importlib.import_module(name) for name in names)]


def docstrings() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = {test.name: test for module in modules() for test in finder.find(module) if test.examples}
    return [found[name] for name in sorted(found)]


# ------------------------------------------------------------------------------------------------------
# stand-ins


def small(pipe: Any, latent: int = 8) -> Any:
    """A tiny pipeline that is native at (and defaults to) ``latent`` cells a side, progress bars off."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    denoiser.register_to_config(sample_size=latent)
    if hasattr(pipe, "default_sample_size"):
        pipe.default_sample_size = latent
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_with_medium_heads() -> Any:
    """The tiny SD3 with SD3-medium's 24 heads per layer (4 dims each), so head indices such as 15 exist."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = tiny.tiny_sd3()
    torch.manual_seed(0)
    config = {
        **pipe.transformer.config,
        "num_attention_heads": 24,
        "attention_head_dim": 4,
        "caption_projection_dim": 24 * 4,
    }
    transformer = SD3Transformer2DModel.from_config(config).eval()
    return small(StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer}))


def a_surgery(ns: dict[str, Any]) -> Any:
    """What a plugin's ``attach`` receives: a surgery (here one without plugins) on ``pipe``."""
    return attnsurgery.apply(ns["pipe"])


def write_convfusion_folder(ns: dict[str, Any]) -> None:
    """``convfusion-sd15``: fresh (untrained) ConvFusion blocks for ``pipe``, saved as a trained folder is."""
    pipe = ns["pipe"]
    with attnsurgery.patched(pipe, attnsurgery.ConvFusion()):
        attnsurgery.ConvFusion.extract(pipe).save("convfusion-sd15")


def write_head_set(ns: dict[str, Any]) -> None:
    """``heads.json``: a head set for ``pipe``, as ``attnsurgery hunt`` writes one."""
    from attnsurgery.perturbation.headset import HeadSet, model_fingerprint

    model = attnsurgery.describe(ns["pipe"].unet, vae_scale_factor=ns["pipe"].vae_scale_factor)
    HeadSet(("down_blocks.0.attentions.0.transformer_blocks.0.attn1:0",), model_fingerprint(model)).save("heads.json")


COMMON: dict[str, Callable[[dict[str, Any]], Any]] = {
    "torch": lambda ns: torch,
    "np": lambda ns: np,
    "F": lambda ns: F,
    "Path": lambda ns: Path,
    "surg": lambda ns: attnsurgery,
    "attnsurgery": lambda ns: attnsurgery,
    "pipe": lambda ns: small(tiny.tiny_sd15()),
}
# docstring name -> names built for it after COMMON's (in order; each may use those before), overriding
# COMMON and the module's globals; "setup" only prepares files in the example's folder
SPECIAL: dict[str, dict[str, Callable[[dict[str, Any]], Any]]] = {
    "attnsurgery": {"plugins": lambda ns: (attnsurgery.TokenMerging(ratio=0.5),)},
    "attnsurgery.families.detect_family": {"pipe": lambda ns: small(tiny.tiny_sdxl())},
    "attnsurgery.plugins.perturbation.PerturbedAttention": {"pipe": lambda ns: sd3_with_medium_heads()},
    "attnsurgery.plugins.neighborhood.NeighborhoodAttention": {"pipe": lambda ns: small(tiny.tiny_flux())},
    "attnsurgery.selectors": {"info": lambda ns: attnsurgery.describe(sd3_with_medium_heads().transformer)},
    "attnsurgery.processors.base.WrappingProcessor": {
        "pipe": COMMON["pipe"],
        "surgery": a_surgery,
        "layer": lambda ns: ns["surgery"].model.layers[0],
    },
    "attnsurgery.processors.window_attention.WindowAttentionProcessor": {
        "pipe": COMMON["pipe"],
        "surgery": a_surgery,
        "layer": lambda ns: ns["surgery"].model.layers[0],
    },
    "attnsurgery.testing.restore": {"MyPlugin": lambda ns: Everything},  # a plugin using every recording API
    "attnsurgery.convfusion.plugin.ConvFusion": {"setup": write_convfusion_folder},
    "attnsurgery.perturbation.headset.HeadSet": {"setup": write_head_set},
}


def mentioned(test: doctest.DocTest) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", "".join(example.source for example in test.examples)))


def namespace(test: doctest.DocTest) -> dict[str, Any]:
    names = mentioned(test)
    ns = dict(test.globs)
    for name, build in COMMON.items():
        if name in names and name not in ns:
            ns[name] = build(ns)
    for name, build in SPECIAL.get(test.name, {}).items():
        value = build(ns)
        if name != "setup":
            ns[name] = value
    return ns


# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("test", docstrings(), ids=lambda test: test.name)
def test_docstring_examples(test: doctest.DocTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if all(example.options.get(doctest.SKIP) for example in test.examples):
        pytest.skip("every example is marked +SKIP")
    monkeypatch.chdir(tmp_path)
    test.globs = namespace(test)
    report: list[str] = []
    try:
        result = doctest.DocTestRunner(optionflags=FLAGS).run(test, out=report.append, clear_globs=False)
    finally:
        for value in test.globs.values():  # undo surgeries an example left applied (their registry is global)
            if isinstance(value, DiffusionPipeline):
                attnsurgery.remove(value)
        test.globs.clear()
    if result.failed:
        pytest.fail("".join(report), pytrace=False)
