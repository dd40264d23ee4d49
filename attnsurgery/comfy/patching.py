"""What every attnsurgery node needs from a ComfyUI MODEL: its attention sites, timing and version shims.

ComfyUI calls attn1 patches with q, k, v as [batch, tokens, heads * dim] and puts the per-call facts
(``n_heads``, ``sigmas``, ``block``, ``cond_or_uncond``...) into ``extra_options``; nodes read those, never
state of their own. ComfyUI itself is imported lazily: this module imports without it.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import inventory, rng, selectors
from ..families import Family
from ..perturbation.headset import FORMAT as HEADSET_FORMAT

__all__ = [
    "AttentionSite",
    "unet_attention_sites",
    "model_family",
    "model_sampling",
    "select_heads",
    "select_layers",
    "site_inventory",
    "claim_token_layers",
    "token_grid",
    "call_generator",
    "sigma_window",
    "current_sigma",
    "with_attn1_replace",
    "conditional_prediction",
    "wrap_unet",
    "comfy_attention",
    "split_heads",
    "merge_heads",
]

DIT_LIMITATION = (
    "U-Nets only (SD1.x, SD2.x, SDXL): this node does not act on DiTs (SD3, FLUX, Qwen-Image, ...); on FLUX "
    "and SD3 use the attnsurgery Perturbed Attention, Neighborhood Attention, Token Merging and Agent "
    "Attention nodes, elsewhere the attnsurgery diffusers plugins."
)


@dataclass(frozen=True)
class AttentionSite:
    """One U-Net self-attention layer as ComfyUI keys it, with its diffusers path (the library's layer names).

    It reads as an :class:`~attnsurgery.inventory.AttentionLayer` to the selectors (path, kind, heads, level).
    """

    kind: ClassVar[str] = "self"
    block_index: ClassVar[None] = None  # a DiT block number; sites are U-Net layers
    block: tuple[str, int]
    transformer_index: int
    heads: int
    path: str
    level: int  # 0 at the latent resolution, +1 per downsampler
    module: str  # the attn1 module's path in ComfyUI's model: the key of object patches

    @property
    def key(self) -> tuple[str, int, int]:
        """The key of ComfyUI's attn1 replace patches."""
        return (self.block[0], self.block[1], self.transformer_index)


def _diffusers_prefix(name: str, number: int, per_level: int) -> str:
    if name == "middle":
        return "mid_block.attentions.0"
    if name == "input":  # input 0 is conv_in; each level holds its res blocks and a downsampler
        level, index = divmod(number - 1, per_level)
        return f"down_blocks.{level}.attentions.{index}"
    level, index = divmod(number, per_level)
    return f"up_blocks.{level}.attentions.{index}"


def unet_attention_sites(model: Any) -> list[AttentionSite]:
    """Every self-attention site of a ComfyUI MODEL's U-Net, in execution order.

    Raises:
        NotImplementedError: the model is not a U-Net (no patch point for DiTs in this ComfyUI).
    """
    unet = model.model.diffusion_model
    if not hasattr(unet, "input_blocks"):
        raise NotImplementedError(f"{type(unet).__name__}: {DIT_LIMITATION}")
    per_level = int(unet.num_res_blocks[0]) + 1
    deepest = len(unet.num_res_blocks) - 1
    sites = []
    groups = [
        ("input", "input_blocks.{}", unet.input_blocks),
        ("middle", "middle_block", [unet.middle_block]),
        ("output", "output_blocks.{}", unet.output_blocks),
    ]
    for name, attribute, blocks in groups:
        for number, block in enumerate(blocks):
            container = "diffusion_model." + attribute.format(number)
            for position, layer in enumerate(block):
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", ())):
                    path = f"{_diffusers_prefix(name, number, per_level)}.transformer_blocks.{index}.attn1"
                    level = {
                        "input": (number - 1) // per_level,
                        "middle": deepest,
                        "output": deepest - number // per_level,
                    }[name]
                    module = f"{container}.{position}.transformer_blocks.{index}.attn1"
                    site = AttentionSite((name, number), index, int(transformer.n_heads), path, level, module)
                    sites.append(site)
    return sites


def _spec_items(spec: str) -> list[str]:
    """The items of a node's layer or head spec, for the library's selectors.

    The spec is text (items split by :func:`~attnsurgery.selectors.split_items`), a JSON list of items, a
    JSON head set ``{"path": [heads] or null}``, or a head-set file written by ``attnsurgery hunt`` (its
    path or its text).
    """
    text = spec.strip()
    if text.endswith(".json") and Path(text).expanduser().is_file():
        text = Path(text).expanduser().read_text().strip()
    if not text.startswith(("[", "{")):
        return selectors.split_items(text)
    data = json.loads(text)
    if isinstance(data, dict) and data.get("format") == HEADSET_FORMAT:  # `attnsurgery hunt --out`
        data = data["heads"]
    if isinstance(data, dict):  # {"path": [heads] or null}; an empty list names no head of that layer
        return [
            path if heads is None else f"{path}:{','.join(str(int(h)) for h in heads)}"
            for path, heads in data.items()
            if heads is None or len(heads)
        ]
    return [str(item) for item in data]


def site_inventory(sites: list[Any], family: Family | None = None) -> inventory.ModelInfo:
    """The sites as the library's inventory of a model, so that its selectors address them.

    ``family`` (see :func:`model_family`) names the model in error messages; without it, a generic U-Net.
    """
    family = family if family is not None else Family("U-Net", "unet", 512, 8)
    if family.kind != "unet":  # DiT sites (attnsurgery.comfy.dit): joint, single and image-only layers
        return inventory.ModelInfo(family, tuple(sites), 1, layer_noun="attention layer")
    levels = max((site.level for site in sites), default=0) + 1
    return inventory.ModelInfo(family, tuple(sites), levels, layer_noun="self-attention layer")


def select_heads(sites: list[Any], spec: str, family: Family | None = None) -> dict[Any, list[int]]:
    """Resolve a node's head spec to {site: sorted heads}, with the library's selectors.

    A spec lists layer selectors (every head) and ``selector:h1,h2`` items (those heads), separated by
    newlines, spaces, ';' or ',', or is a JSON head set (a list of such strings, or ``{"path": [heads]}``),
    or a head-set file. Selectors are those of :mod:`attnsurgery.selectors` on the diffusers layer paths:
    an exact path, an enclosing path (``mid_block``, ``up_blocks.1``), a glob (``*`` within one segment,
    ``**`` across) or a group (``top``, ``mid``, ``down``, ``up``, ``all``; on DiTs ``all``, ``joint``,
    ``single``). ``sites`` are U-Net :class:`AttentionSite` or DiT :class:`~attnsurgery.comfy.dit.DitSite`.

    Raises:
        ValueError: a selector matches nothing (the message lists the layers) or a head is out of range.
    """
    chosen = selectors.select_heads(site_inventory(sites, family), _spec_items(spec))
    by_path = {site.path: site for site in sites}
    return {
        by_path[path]: sorted(range(by_path[path].heads) if heads is None else heads) for path, heads in chosen.items()
    }


def select_layers(sites: list[AttentionSite], spec: str, family: Family | None = None) -> set[tuple[str, int, int]]:
    """Resolve a layer spec (the head-spec syntax, every head) to the ComfyUI keys of those layers."""
    return {site.key for site in select_heads(sites, spec, family)}


CLAIMS_KEY = "attnsurgery_token_layers"


def claim_token_layers(patched: Any, keys: set[tuple[str, int, int]], owner: str) -> None:
    """Record that ``owner`` changes the token count of these layers on the clone ``patched``.

    Two token-changing nodes on one layer would hand each other merged tokens; refuse that up front.

    Raises:
        ValueError: an earlier node in the chain already changes some of these layers.
    """
    claims = patched.model_options.setdefault(CLAIMS_KEY, {})
    taken = sorted((key, claims[key]) for key in keys if key in claims)
    if taken:
        raise ValueError(
            f"{owner} and {taken[0][1]} would both change the tokens of {[k for k, _ in taken]}; "
            "give them different layers or use one of them"
        )
    claims.update(dict.fromkeys(keys, owner))


def token_grid(original_shape: list[int], num_tokens: int) -> tuple[int, int]:
    """(rows, cols) of a U-Net attention call over ``num_tokens`` on a latent of ``original_shape``
    (ComfyUI's ``extra_options["original_shape"]``), by :func:`attnsurgery.inventory.find_token_grid`.

    Raises:
        ValueError: no U-Net level of that latent holds that many tokens.
    """
    return inventory.find_token_grid((int(original_shape[-2]), int(original_shape[-1])), num_tokens)


def call_generator(seed: int, extra_options: dict) -> torch.Generator:
    """A private generator keyed by the seed, the layer and the sigma of this call: reproducible runs."""
    return rng.keyed_generator(
        seed,
        tuple(extra_options["block"]),
        extra_options["block_index"],
        round(current_sigma(extra_options["sigmas"]), 5),
    )


def model_family(model: Any) -> Family:
    """The library's family of a ComfyUI U-Net, from its unet_config (presets and native size hang off it).

    SDXL by its 2816-wide pooled/size conditioning (1024 px), SD2 by its 1024-wide text context (768 px for
    v-prediction, else 512), anything else as SD1.x (512 px).
    """
    config = model.model.model_config.unet_config
    inpaint = int(config.get("in_channels", 4)) == 9
    if config.get("adm_in_channels") == 2816:
        return Family("sdxl-inpaint" if inpaint else "sdxl", "unet", 1024, 8, inpaint=inpaint)
    if config.get("context_dim") == 1024:
        native = 768 if model.model.model_type.name == "V_PREDICTION" else 512
        return Family("sd2", "unet", native, 8, inpaint=inpaint)
    return Family("sd15", "unet", 512, 8, inpaint=inpaint)


def model_sampling(model: Any) -> Any:
    """The MODEL's sampling object (sigmas, ``percent_to_sigma``), honouring object patches on newer ComfyUI."""
    get_object = getattr(model, "get_model_object", None)
    return get_object("model_sampling") if get_object is not None else model.model.model_sampling


def sigma_window(model: Any, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma at start, sigma at end) of a denoising-percent window; active while end <= sigma <= start."""
    sampling = model_sampling(model)
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))


def current_sigma(sigmas: torch.Tensor) -> float:
    """The sigma of this call (``extra_options["sigmas"]`` or a post-CFG ``sigma``; one value per batch row)."""
    return float(sigmas.flatten()[0])


def with_attn1_replace(model_options: dict, patches: dict[tuple[str, int, int], Any]) -> dict:
    """A copy of ``model_options`` with attn1 replace patches added; the input dicts are not changed."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    replace = dict(transformer_options.get("patches_replace", {}))
    attn1 = dict(replace.get("attn1", {}))
    attn1.update(patches)
    replace["attn1"] = attn1
    transformer_options["patches_replace"] = replace
    options["transformer_options"] = transformer_options
    return options


def conditional_prediction(model: Any, cond: Any, x: torch.Tensor, sigma: torch.Tensor, model_options: dict):
    """The denoised conditional prediction alone (``calc_cond_batch`` on current ComfyUI, older API before)."""
    import comfy.samplers

    calc_cond_batch = getattr(comfy.samplers, "calc_cond_batch", None)
    if calc_cond_batch is not None:
        return calc_cond_batch(model, [cond], x, sigma, model_options)[0]
    return comfy.samplers.calc_cond_uncond_batch(model, cond, None, x, sigma, model_options)[0]


UnetCall = Callable[[torch.Tensor, dict, Any], torch.Tensor]
"""Runs the U-Net on (x, transformer_options, control) with everything else of the call unchanged."""


def wrap_unet(patched: Any, key: str, around: Callable[[UnetCall, torch.Tensor, dict, Any], torch.Tensor]) -> None:
    """Run ``around(call, x, transformer_options, control)`` in place of each U-Net call of the clone ``patched``.

    ``around`` may change the options and the control residuals and must call ``call`` once. Where ComfyUI has
    keyed wrappers (``add_wrapper_with_key``, newer versions) it is a diffusion-model wrapper under ``key``,
    beside any other node's; before that, the single-slot ``model_function_wrapper``, innermost under the one
    an earlier node set (so it sees the tensor that reaches the U-Net). A later node that sets that slot
    without calling on drops it there: nothing can prevent that on those versions.
    """
    if hasattr(patched, "add_wrapper_with_key"):
        import comfy.patcher_extension

        def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
            def call(x: torch.Tensor, options: dict, control: Any) -> torch.Tensor:
                return executor(x, timesteps, context, y, control, options, **kwargs)

            return around(call, x, transformer_options, control)

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key, wrapper)
        return
    previous = patched.model_options.get("model_function_wrapper")

    def inner(apply_model: Callable, x: torch.Tensor, t: torch.Tensor, **c: Any) -> torch.Tensor:
        def call(x: torch.Tensor, options: dict, control: Any) -> torch.Tensor:
            return apply_model(x, t, **{**c, "transformer_options": options, "control": control})

        return around(call, x, c.get("transformer_options", {}), c.get("control"))

    def legacy(apply_model: Callable, args: dict) -> torch.Tensor:
        if previous is None:
            return inner(apply_model, args["input"], args["timestep"], **args["c"])
        return previous(lambda x, t, **c: inner(apply_model, x, t, **c), args)

    patched.set_model_unet_function_wrapper(legacy)


@functools.cache
def _takes_options(function: Callable) -> bool:
    parameters = inspect.signature(function).parameters.values()  # follows functools.wraps
    return any(p.kind is p.VAR_KEYWORD or p.name == "transformer_options" for p in parameters)


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """Plain attention through ComfyUI's own function: q, k, v [batch, tokens, heads * dim] -> the same shape.

    That is the backend ComfyUI was started with (PyTorch SDPA, xformers, sage, flash, split, ...) and, where
    it takes ``transformer_options`` (newer ComfyUI), an ``optimized_attention_override`` set in them, so a
    patch that computes attention itself honours the user's choice as ComfyUI's own layers do.
    ``extra_options`` is the attn1 patch's (``n_heads``, ``attn_precision`` and the call's options).
    """
    from comfy.ldm.modules import attention

    function = attention.optimized_attention
    if not _takes_options(function):  # ComfyUI of March 2024: (q, k, v, heads, mask=None)
        return function(q, k, v, extra_options["n_heads"])
    precision = extra_options.get("attn_precision")
    return function(q, k, v, extra_options["n_heads"], attn_precision=precision, transformer_options=extra_options)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, tokens, heads * dim] -> [batch, heads, tokens, dim]."""
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, dim] -> [batch, tokens, heads * dim]."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)
