"""ComfyUI's DiTs (FLUX, SD3) for the nodes: their attention sites in diffusers names, and the patch point.

Current ComfyUI runs each DiT block through ``patches_replace["dit"][("double_block" | "single_block", i)]``
when one is registered, handing it the block's ``transformer_options``, and every attention call of Flux and
MMDiT passes those options into ``optimized_attention``, which calls an ``optimized_attention_override`` found
there as ``override(func, *args, **kwargs)`` (``func``: the backend ComfyUI was started with). A node's block
patch puts an override into a copy of the options for that block's call alone, so it sees exactly the
queries, keys (after RoPE) and values of that block's attention, and leaves the rest of the model alone.

Overrides chain: one found in the options (another node's, or an inner patch of ours) stays in the call. An
*edit* (perturbed attention) takes the attention that chain computes and changes its result; a *replacement*
(neighborhood attention, token merging, agents: the plugin's own joint-call processor, run per call) hands the
chain its own function in place of ``func``, so an edit around it edits the replaced result, in either order
of the nodes, as the diffusers plugins do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from .. import rng
from ..families import Family
from .patching import claim_token_layers, current_sigma, model_sampling

__all__ = [
    "DIT_MIN_COMFYUI",
    "DitSite",
    "DitCall",
    "dit_sites",
    "dit_family",
    "check_dit_patch_points",
    "block_patch",
    "sites_by_block",
    "with_block_patches",
    "add_token_grid",
    "token_grid_of",
    "install_replacement",
    "CallClock",
    "processor_replacement",
    "patch_joint_processors",
]

#: The ComfyUI the DiT nodes were verified on (its ``optimized_attention_override`` and DiT block patches);
#: the first release with both was not pinned down, so the refusal names this one.
DIT_MIN_COMFYUI = "0.20.1"
GRID_KEY = "attnsurgery_token_grid"

BlockKey = tuple[str, int]


@dataclass(frozen=True)
class DitSite:
    """One attention call of a ComfyUI DiT block, under its diffusers path (it reads as an inventory layer).

    Attributes:
        path: the diffusers layer (``transformer_blocks.3.attn``, ``single_transformer_blocks.0.attn``,
            SD3.5's image-only ``transformer_blocks.0.attn2``).
        kind: ``joint`` (text and image streams), ``single`` (one concatenated sequence) or ``self`` (image
            only).
        heads: attention heads.
        block_index: the block's number in forward order (double blocks, then single ones).
        block: the key of the block's ``patches_replace["dit"]`` patch.
        call: which attention call of the block it is (SD3.5's dual blocks make two).
    """

    level: ClassVar[None] = None  # a U-Net level; sites are DiT layers
    path: str
    kind: Literal["joint", "single", "self"]
    heads: int
    block_index: int
    block: BlockKey
    call: int = 0


def check_dit_patch_points() -> None:
    """Refuse a ComfyUI without the patch points the DiT nodes use.

    Raises:
        NotImplementedError: naming the version to update to.
    """
    from comfy.ldm.modules import attention

    if not hasattr(attention, "wrap_attn"):  # where optimized_attention_override is honoured
        raise NotImplementedError(
            "this ComfyUI has no optimized_attention_override (transformer_options inside DiT attention), which "
            "the attnsurgery DiT nodes use with patches_replace['dit'] block patches; update ComfyUI to "
            f"{DIT_MIN_COMFYUI} or newer (the version they were verified on)"
        )


def dit_sites(model: Any) -> list[DitSite]:
    """Every attention site of a ComfyUI Flux or MMDiT (SD3, SD3.5), in forward order.

    Raises:
        NotImplementedError: another diffusion model, or a ComfyUI without the DiT patch points.
    """
    check_dit_patch_points()
    net = model.model.diffusion_model
    name = type(net).__name__
    if name == "Flux":
        double = [
            DitSite(f"transformer_blocks.{i}.attn", "joint", block.num_heads, i, ("double_block", i))
            for i, block in enumerate(net.double_blocks)
        ]
        start = len(double)
        single = [
            DitSite(f"single_transformer_blocks.{i}.attn", "single", block.num_heads, start + i, ("single_block", i))
            for i, block in enumerate(net.single_blocks)
        ]
        return double + single
    if name in ("MMDiT", "OpenAISignatureMMDITWrapper"):
        sites = []
        for i, block in enumerate(net.joint_blocks):
            x_block, key = block.x_block, ("double_block", i)
            sites.append(DitSite(f"transformer_blocks.{i}.attn", "joint", x_block.attn.num_heads, i, key))
            if x_block.x_block_self_attn:  # SD3.5's dual blocks: an image-only second call
                sites.append(DitSite(f"transformer_blocks.{i}.attn2", "self", x_block.attn2.num_heads, i, key, 1))
        return sites
    raise NotImplementedError(
        f"{name}: the attnsurgery DiT nodes act on FLUX (Flux) and SD3/SD3.5 (MMDiT) models; this one has no "
        "layer map in the pack yet. Use the attnsurgery diffusers plugins for it."
    )


def dit_family(model: Any) -> Family:
    """The library's family of a ComfyUI DiT (native size, patch size, name in messages)."""
    net = model.model.diffusion_model
    if type(net).__name__ == "Flux":
        name = "flux2" if net.params.global_modulation else "flux"
        return Family(name, "mmdit", 1024, 8, patch_size=net.patch_size)
    dual = any(block.x_block.x_block_self_attn for block in net.joint_blocks)
    return Family("sd35" if dual else "sd3", "mmdit", 1024, 8, patch_size=net.patch_size)


@dataclass(frozen=True)
class DitCall:
    """One attention call of a patched block, heads split out.

    Attributes:
        site: the layer this call is.
        q, k, v: ``[batch, heads, tokens, dim]``; keys after RoPE.
        num_text: non-image tokens before the image tokens (0 for an image-only call).
        mask: the call's mask, or None.
        scale: its softmax scale, None for SDPA's default.
        options: the block's ``transformer_options``.
    """

    site: DitSite
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    num_text: int
    mask: torch.Tensor | None
    scale: float | None
    options: dict


#: An edit gets the call and the chain's attention output (both ``[B, H, N, D]``) and returns the new output.
Edit = Callable[[DitCall, torch.Tensor], torch.Tensor]
#: A replacement computes the call's output ``[B, H, N, D]`` itself, or returns None to leave the call as it is.
Replacement = Callable[[DitCall], torch.Tensor | None]


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H * D] (or MMDiT's values, [B, N, H, D]) -> [B, H, N, D], as ComfyUI's attention splits them."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _call(site: DitSite, num_text: int, options: dict, args: tuple, kwargs: dict) -> DitCall:
    """The call's tensors as ``[B, H, N, D]`` from ComfyUI's ``optimized_attention`` arguments."""
    q, k, v = args[:3]
    if not kwargs.get("skip_reshape", False):  # MMDiT: [B, N, H * D]; Flux already passes [B, H, N, D]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        q, k, v = (_split(t, heads) for t in (q, k, v))
    return DitCall(site, q, k, v, num_text, kwargs.get("mask"), kwargs.get("scale"), options)


def _shaped(out: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``[B, H, N, D]`` in the layout the caller asked ``optimized_attention`` for."""
    if kwargs.get("skip_output_reshape", False):
        return out
    batch, heads, tokens, dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * dim)


def _unshaped(out: torch.Tensor, heads: int, kwargs: dict) -> torch.Tensor:
    return out if kwargs.get("skip_output_reshape", False) else _split(out, heads)


def block_patch(
    sites: list[DitSite],
    previous: Callable | None,
    *,
    edit: Edit | None = None,
    replace: Replacement | None = None,
    technique: str,
) -> Callable:
    """A ``patches_replace["dit"]`` patch running one block with ``edit`` or ``replace`` on the calls of
    ``sites`` (sites of that block); ``previous``, a patch already at that key, runs inside it.

    Raises (while sampling):
        RuntimeError: the block made fewer attention calls through the options than the sites expect (a
            model or node that drops ``transformer_options``): the technique would silently not act.
    """
    by_call = {site.call: site for site in sites}

    def patch(args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        # the text tokens before the image ones: a double block's txt stream, a single block's img_slice
        num_text = args["txt"].shape[1] if args.get("txt") is not None else options["img_slice"][0]
        chain = options.get("optimized_attention_override")
        calls = [0]

        def override(func: Callable, *a: Any, **kw: Any) -> torch.Tensor:
            index, calls[0] = calls[0], calls[0] + 1
            site = by_call.get(index)
            if site is None:
                return chain(func, *a, **kw) if chain is not None else func(*a, **kw)
            call = _call(site, 0 if site.kind == "self" else num_text, options, a, kw)
            if replace is not None:
                out = replace(call)
                if out is not None:  # the chain gets our result in place of ComfyUI's attention function
                    func = lambda *_, **__: _shaped(out, kw)  # noqa: E731
                return chain(func, *a, **kw) if chain is not None else func(*a, **kw)
            dense = chain(func, *a, **kw) if chain is not None else func(*a, **kw)
            return _shaped(edit(call, _unshaped(dense, site.heads, kw)), kw)

        args = {**args, "transformer_options": {**options, "optimized_attention_override": override}}
        out = previous(args, extra) if previous is not None else extra["original_block"](args)
        if calls[0] <= max(by_call):
            raise RuntimeError(
                f"{technique} could not reach the attention of {sites[-1].path}: the block made {calls[0]} "
                "attention calls through transformer_options. A node that replaces this block without passing "
                "its transformer_options on hides it; apply that node before this one or leave it out."
            )
        return out

    return patch


def sites_by_block(sites: list[DitSite]) -> dict[BlockKey, list[DitSite]]:
    """The sites grouped by their block's patch key."""
    blocks: dict[BlockKey, list[DitSite]] = {}
    for site in sites:
        blocks.setdefault(site.block, []).append(site)
    return blocks


def with_block_patches(model_options: dict, make: Callable[[BlockKey, Callable | None], Callable], keys) -> dict:
    """A copy of ``model_options`` with ``make(key, previous)`` as the DiT block patch at each key.

    The input dicts are not changed; ``previous`` is the patch already at that key (run inside the new one).
    """
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    replace = dict(transformer_options.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    for key in keys:
        dit[key] = make(key, dit.get(key))
    replace["dit"] = dit
    transformer_options["patches_replace"] = replace
    options["transformer_options"] = transformer_options
    return options


def add_token_grid(patched: Any) -> None:
    """Put the image-token grid of each model call into its ``transformer_options`` (keyed APPLY_MODEL wrapper).

    ComfyUI hands DiT blocks token sequences without their 2-D shape; local attention needs it.
    """
    import comfy.patcher_extension

    patch = int(patched.model.diffusion_model.patch_size)

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        grid = (-(-x.shape[-2] // patch), -(-x.shape[-1] // patch))  # Flux and MMDiT pad to the patch size
        options = {**transformer_options, GRID_KEY: grid}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, GRID_KEY, wrapper)


def token_grid_of(call: DitCall, technique: str) -> tuple[int, int]:
    """The image-token grid of this call, checked against its token count.

    Raises:
        RuntimeError: the call holds other image tokens too (reference latents such as FLUX Kontext's).
    """
    grid = call.options[GRID_KEY]
    image = call.q.shape[2] - call.num_text
    if image != grid[0] * grid[1]:
        raise RuntimeError(
            f"{technique} on {call.site.path}: the call holds {image} image tokens, not the {grid[0]}x{grid[1]} "
            "grid of the latent (reference latents, e.g. FLUX Kontext, add their own); leave out the reference "
            "images or this node"
        )
    return grid


def install_replacement(patched: Any, sites: list[DitSite], replace: Replacement, technique: str) -> None:
    """Register ``replace`` on the blocks of ``sites`` on the clone ``patched`` (each block patch chained around
    one already there) and the wrapper that hands the blocks their token grid."""
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for key, block_sites in sites_by_block(sites).items():
        patch = block_patch(block_sites, existing.get(key), replace=replace, technique=technique)
        patched.set_model_patch_replace(patch, "dit", *key)
    add_token_grid(patched)


@dataclass(frozen=True)
class CallClock:
    """The step-clock facets the library's joint-call processors read, for one ComfyUI call.

    ``in_first(fraction)`` holds while the call's sigma is above the model's sigma at that denoising percent,
    the rule of the U-Net agent node's phases.
    """

    grid: tuple[int, int]
    sigma: float
    percent_to_sigma: Callable[[float], float]

    def image_grid(self) -> tuple[int, int]:
        return self.grid

    def in_first(self, fraction: float) -> bool:
        return self.sigma > float(self.percent_to_sigma(fraction))

    def watch(self, *fractions: float) -> None:
        """Nothing to precompute: a ComfyUI node's call is never compiled with the clock inside (the step
        context's ``watch`` exists for compiled denoisers)."""


class _NoLayerProcessor:
    """The inner processor of a joint-call processor a node runs: ComfyUI's block computes q, k, v itself, so
    there is no diffusers processor below ours (a class with a Python ``__call__``, as wrappers require)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a joint-call processor run by a ComfyUI node has no layer processor to call")


_NO_LAYER_PROCESSOR = _NoLayerProcessor()


#: Builds a library joint-call processor (``processors.joint_replace.JointCallProcessor``) for one call:
#: ``make(inner, site, clock, seed)``, ``seed`` this call's private seed (a refreshed ``rng.CallInt``) or None.
ProcessorFactory = Callable[[Callable, DitSite, CallClock, rng.CallInt | None], Any]


def processor_replacement(model: Any, make: ProcessorFactory, seed: int | None, technique: str) -> Replacement:
    """A replacement that runs the library's joint-call processor of a technique on each call: its ``plan``
    (phases, sizes, whether to act) and its compute, on the call's q, k, v, so the node's maths is the plugin's.

    ``seed`` keys the private seed per layer and sigma (None: each cell's first position).
    """
    sampling = model_sampling(model)

    def replace(call: DitCall) -> torch.Tensor | None:
        sigma = current_sigma(call.options["sigmas"])
        clock = CallClock(token_grid_of(call, technique), sigma, sampling.percent_to_sigma)

        call_seed = None
        if seed is not None:
            call_seed = rng.CallInt(lambda: rng.keyed_seed(seed, call.site.path, round(sigma, 5)))
            call_seed.refresh()
        compute = make(_NO_LAYER_PROCESSOR, call.site, clock, call_seed).plan()
        if compute is None:
            return None
        sdpa = {"attn_mask": call.mask, "dropout_p": 0.0, "is_causal": False, "scale": call.scale}
        return compute(call.q, call.k, call.v, sdpa)

    return replace


def patch_joint_processors(
    model: Any, selected: list[DitSite], make: ProcessorFactory, seed: int | None, technique: str
) -> Any:
    """The clone of ``model`` whose ``selected`` sites run the joint-call processors ``make`` builds: the token
    claim, the block patches and the grid wrapper of the merging, agent and neighbourhood nodes."""
    patched = model.clone()
    claim_token_layers(patched, {site.path for site in selected}, technique)
    install_replacement(patched, selected, processor_replacement(model, make, seed, technique), technique)
    return patched
