"""The surgery handle: every change is recorded when made and undone in reverse by ``remove()``.

Plugins never touch a model directly. They ask the :class:`Surgery` to swap a processor, swap a module,
add a hook or set an attribute; the surgery snapshots what was there (the same object, and *where* it
lived: a module's ``_modules``, ``_parameters``, ``_buffers`` or ``__dict__``, or nowhere) and puts exactly
that back. Claims by role catch plugins that would fight over one layer before anything runs.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch._dynamo.eval_frame import OptimizedModule, reset_code

from .context import StepContext, make_clock_hook
from .inventory import AttentionLayer, ModelInfo, describe
from .rng import CallInt, keyed_generator, keyed_seed

if TYPE_CHECKING:
    from .plugins.base import Plugin

__all__ = ["Surgery", "apply", "remove", "patched", "active_surgeries", "resolve_target", "uncompiled", "ROLES"]

logger = logging.getLogger(__name__)

# What a change does to a site; two claims on one site conflict unless listed as compatible.
#   tokens: changes which tokens attend to which (windows, agents, merging)
#   heads:  changes the per-head attention output (perturbation guidance)
#   module: replaces the module outright (distilled replacements)
#   blocks: resizes features inside U-Net blocks (RAU-Net)
#   guidance: changes the denoiser's batch and output (one guidance term at a time)
ROLES = ("tokens", "heads", "module", "blocks", "guidance")
_COMPATIBLE = {frozenset({"tokens", "heads"}), frozenset({"blocks", "tokens"}), frozenset({"blocks", "heads"})}
# The fix for a conflict over one role; a guidance claim sits on the denoiser, so "other layers" cannot help there.
_CONFLICT_FIX = {
    "guidance": "One guidance term runs per denoiser: put every layer or head in one plugin, e.g. one "
    "PerturbedAttention(layers=[...]) or PerturbedAttention(heads=[...]), or remove the earlier surgery first.",
}
_DEFAULT_FIX = "Apply these plugins to different layers (layers=...), or remove the earlier surgery first."

_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, list[Surgery]] = weakref.WeakKeyDictionary()


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile(module)`` wrapped (its ``_orig_mod``), or ``module`` itself.

    The surgery works on the original module: its processors, submodules and hooks are what the compiled
    wrapper runs, and ``remove()`` restores them there.
    """
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def resolve_target(target: Any) -> tuple[Any | None, torch.nn.Module]:
    """Split ``target`` into (pipeline or None, denoiser); a compiled denoiser is unwrapped (:func:`uncompiled`).

    Raises:
        NotImplementedError: the target is neither a pipeline with a ``unet``/``transformer`` nor a denoiser.
    """
    if isinstance(target, torch.nn.Module):
        return None, uncompiled(target)
    for name in ("unet", "transformer"):
        denoiser = getattr(target, name, None)
        if isinstance(denoiser, torch.nn.Module):
            return target, uncompiled(denoiser)
    raise NotImplementedError(
        f"cannot operate on {type(target).__name__}: pass a diffusers pipeline with a `unet` or `transformer`, "
        "or the denoiser itself (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel)"
    )


@dataclass(frozen=True)
class _Snapshot:
    """Where an attribute lived before we changed it, and what it was."""

    store: str  # "_modules", "_parameters", "_buffers", "__dict__" or "absent"
    value: Any


_MODULE_STORES = ("_parameters", "_buffers", "_modules")


def _snapshot(obj: Any, name: str) -> _Snapshot:
    if isinstance(obj, torch.nn.Module):
        for store in _MODULE_STORES:
            table = obj.__dict__[store]
            if name in table:
                return _Snapshot(store, table[name])
    if name in vars(obj):
        return _Snapshot("__dict__", vars(obj)[name])
    return _Snapshot("absent", None)


def _clear(obj: Any, name: str) -> None:
    if isinstance(obj, torch.nn.Module):
        for store in _MODULE_STORES:
            obj.__dict__[store].pop(name, None)
    vars(obj).pop(name, None)


def _restore(obj: Any, name: str, snap: _Snapshot) -> None:
    _clear(obj, name)
    if snap.store == "__dict__":
        vars(obj)[name] = snap.value
    elif snap.store != "absent":
        obj.__dict__[snap.store][name] = snap.value


def _assign(obj: Any, name: str, value: Any) -> None:
    """``setattr`` that may replace a child module by a plain object (nn.Module refuses that)."""
    if isinstance(obj, torch.nn.Module) and not isinstance(value, torch.nn.Module):
        obj.__dict__["_modules"].pop(name, None)
    setattr(obj, name, value)


def _set_and_undo(obj: Any, name: str, value: Any, yield_to_later: bool = False) -> Callable[[], None]:
    """Set ``obj.name = value``; returns what puts back exactly what was there (or that nothing was).

    With ``yield_to_later`` the undo leaves the attribute alone once it no longer holds ``value``: someone set
    it after us, and theirs is the newer choice.
    """
    snap = _snapshot(obj, name)
    _assign(obj, name, value)

    def undo() -> None:
        if not yield_to_later or getattr(obj, name, None) is value:
            _restore(obj, name, snap)

    return undo


def _replaced_by(processor: Any) -> str:
    """The diffusers call that most likely installed ``processor``, for the error that names it."""
    name = type(processor).__name__
    if name.startswith("Sliced"):
        return "enable_attention_slicing()"
    if name.startswith("Fused"):
        return "fuse_qkv_projections()"
    if name.startswith("IPAdapter"):
        return "load_ip_adapter()"
    if "XFormers" in name:
        return "enable_xformers_memory_efficient_attention()"
    return "set_attn_processor(), set_default_attn_processor(), unfuse_qkv_projections() or unload_ip_adapter()"


def _eager(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` run outside any graph dynamo traces (it keeps its name for ``Surgery.changes``)."""
    return torch.compiler.disable(hook, recursive=True)


def forget_compiled_code(denoiser: torch.nn.Module) -> None:
    """Drop dynamo's compiled code of ``denoiser``'s forward, so its next compiled call traces it again.

    Guards see swapped processors and modules, but not hooks added or removed on submodules (dynamo skips hook
    guards), so code compiled before ``apply`` would keep running without RAU-Net, and code compiled with the
    plugins would keep them after ``remove()``. Only this class's forward is dropped (other instances of the
    class recompile once too), and for a denoiser compiled in place (``module.compile()``) the module call
    every in-place compiled module shares; never everything, as ``torch._dynamo.reset()`` would.
    """
    function = type(denoiser).forward
    while function is not None:  # diffusers decorates some forwards: the frame dynamo compiled is the outer one
        reset_code(function.__code__)
        function = getattr(function, "__wrapped__", None)
    if getattr(denoiser, "_compiled_call_impl", None) is not None:
        reset_code(torch.nn.Module._call_impl.__code__)


def _pipeline_vae_factor(pipeline: Any) -> int | None:
    factor = getattr(pipeline, "vae_scale_factor", None)
    return int(factor) if isinstance(factor, (int, float)) else None


class Surgery:
    """A set of recorded changes to one denoiser (and its pipeline), undone by :meth:`remove`.

    Made by :func:`apply`; plugins receive it in ``attach`` and change the model only through it.

    Attributes:
        target: what ``apply`` received (pipeline or denoiser).
        pipeline: the pipeline, or None for a bare denoiser.
        denoiser: the U-Net or transformer being operated on.
        model: family and attention-layer inventory of the denoiser.
        context: the step clock every processor of this surgery reads.
        plugins: the plugins, in the order they were attached.
        seed: the seed given to ``apply`` (plugins' own seeds take precedence).
    """

    def __init__(self, target: Any, plugins: tuple[Plugin, ...], seed: int | None = None) -> None:
        self.target = target
        self.pipeline, self.denoiser = resolve_target(target)
        self.model: ModelInfo = describe(self.denoiser, _pipeline_vae_factor(self.pipeline))
        self.context = StepContext(self.model.family)
        self.plugins = plugins
        self.seed = seed
        self._undo: list[tuple[str, str, Callable[[], None]]] = []  # (site, what changed, how to undo)
        self._claims: dict[str, set[str]] = {}
        self._installed: dict[str, tuple[torch.nn.Module, Any]] = {}  # layer path -> (layer, our last processor)
        self._per_call: list[Callable[[], None]] = []  # run after the clock, before every denoiser call
        self._removed = False

    # ----------------------------------------------------------------------------------------------
    # what was changed
    @property
    def sites(self) -> list[str]:
        """Every module path this surgery changed, in order, each once (``<denoiser>`` for its root)."""
        return list(dict.fromkeys(site for site, _, _ in self._undo))

    @property
    def changes(self) -> list[str]:
        """One line per recorded change: ``site: what``."""
        return [f"{site}: {what}" for site, what, _ in self._undo]

    @property
    def active(self) -> bool:
        """False once removed."""
        return not self._removed

    def __repr__(self) -> str:
        names = ", ".join(type(p).__name__ for p in self.plugins) or "no plugins"
        state = "active" if self.active else "removed"
        changes = "".join(f"\n  {change}" for change in self.changes)
        return f"<Surgery {state} on {self.model.family.name}: {names}; {len(self.sites)} sites{changes}>"

    # ----------------------------------------------------------------------------------------------
    # recording API for plugins
    def _site_of(self, module: torch.nn.Module) -> str:
        for path, candidate in self.denoiser.named_modules():
            if candidate is module:
                return path or "<denoiser>"
        return f"<{type(module).__name__} outside the denoiser>"

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this surgery was removed; apply a new one instead of reusing it")

    def claim(self, site: str, role: str) -> None:
        """Reserve ``site`` for ``role``; raises if this or a stacked surgery holds a conflicting claim."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        for surgery in _ACTIVE.get(self.denoiser, []):
            for held in surgery._claims.get(site, ()):
                if held == role or frozenset({held, role}) not in _COMPATIBLE:
                    owner = "this surgery" if surgery is self else "an earlier surgery"
                    fix = _CONFLICT_FIX.get(role, _DEFAULT_FIX) if held == role else _DEFAULT_FIX
                    raise ValueError(
                        f"conflict at {site}: {owner} already changes it as {held!r}, and a plugin now wants "
                        f"{role!r}. {fix}"
                    )
        self._claims.setdefault(site, set()).add(role)

    def set_attr(self, obj: Any, name: str, value: Any, site: str | None = None) -> None:
        """Set ``obj.name = value``, remembering exactly what was there (or that nothing was)."""
        self._check_live()
        label = site or (self._site_of(obj) if isinstance(obj, torch.nn.Module) else type(obj).__name__)
        self._undo.append((label, f"set {name}", _set_and_undo(obj, name, value)))

    def _resolve_layer(self, layer: AttentionLayer | str | torch.nn.Module) -> tuple[str, torch.nn.Module]:
        if isinstance(layer, AttentionLayer):
            return layer.path, layer.module
        if isinstance(layer, str):
            found = self.model.layer(layer)
            return found.path, found.module
        return self._site_of(layer), layer

    def set_processor(self, layer: AttentionLayer | str | torch.nn.Module, processor: Any, *, role: str) -> Any:
        """Give an attention layer a new processor; returns the processor it had (to wrap it).

        Args:
            layer: an AttentionLayer, its path, or the attention module.
            processor: the new processor (typically a WrappingProcessor around the returned one).
            role: what the change does to the layer (see ``ROLES``), for conflict checks.
        """
        self._check_live()
        path, module = self._resolve_layer(layer)
        self.claim(path, role)
        previous = module.processor
        # diffusers calls made after apply (set_attn_processor, attention slicing, fuse_qkv_projections,
        # load_ip_adapter) replace processors: remove() then leaves theirs, and the next call names them
        restore = _set_and_undo(module, "processor", processor, yield_to_later=True)
        self._installed[path] = (module, processor)

        def undo() -> None:
            restore()
            self._unsave(processor, previous)

        self._undo.append((path, "set processor", undo))
        return previous

    def _unsave(self, ours: Any, previous: Any) -> None:
        """diffusers' fuse_qkv_projections keeps the processors it replaces in `original_attn_processors` and
        unfuse_qkv_projections puts them back: once removed, that copy must hold what we replaced, not ours."""
        saved = getattr(self.denoiser, "original_attn_processors", None)
        if isinstance(saved, dict):
            for key, value in saved.items():
                if value is ours:
                    saved[key] = previous

    def swap_module(
        self, path: str, new_module: torch.nn.Module, *, role: str, root: torch.nn.Module | None = None
    ) -> torch.nn.Module:
        """Replace the submodule at ``path`` (relative to ``root``, default the denoiser); returns the old one."""
        self._check_live()
        root = self.denoiser if root is None else root
        parent_path, _, name = path.rpartition(".")
        try:
            parent = root.get_submodule(parent_path) if parent_path else root
            old = parent.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"no submodule {path!r} in {type(root).__name__}: {error}") from None
        if root is self.denoiser:
            self.claim(path, role)
        self.set_attr(parent, name, new_module, site=path)
        return old

    def add_hook(
        self,
        module: torch.nn.Module,
        hook: Callable[..., Any],
        *,
        pre: bool,
        with_kwargs: bool = False,
        prepend: bool = False,
    ) -> None:
        """Register a forward (pre-)hook that ``remove()`` unregisters.

        Hooks on the denoiser itself are where per-call Python decisions belong (the step clock, guidance
        rows, this call's phase): they run eagerly even when the denoiser is compiled (``torch.compile(module)``
        or ``module.compile()`` leave them outside the traced graph), so they never break it. Hooks on
        submodules are traced with the graph and must stay tensor code.
        """
        self._check_live()
        if module is self.denoiser:
            hook = _eager(hook)
        if pre:
            handle = module.register_forward_pre_hook(hook, prepend=prepend, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(hook, prepend=prepend, with_kwargs=with_kwargs)
        kind = "forward pre-hook" if pre else "forward hook"
        self._undo.append(
            (self._site_of(module), f"{kind} {getattr(hook, '__name__', type(hook).__name__)}", handle.remove)
        )

    def generator(self, *keys: object, seed: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
        """A private generator seeded from ``seed`` (else the surgery's, else 0) and ``keys``.

        Keys (a layer path, a step index) give every use its own reproducible stream without shared state;
        the global RNG is never touched (see :func:`attnsurgery.rng.keyed_generator`).
        """
        base = seed if seed is not None else (self.seed if self.seed is not None else 0)
        return keyed_generator(base, *keys, device=device)

    def per_call(self, prepare: Callable[[], None]) -> None:
        """Run ``prepare()`` before every denoiser call, after the step clock, outside any compiled graph.

        This is where a plugin makes its per-call Python choices (a window shift, a random seed) and stores
        them as tensors its processors read, so a compiled denoiser sees new values, not a new graph.
        """
        self._check_live()
        self._per_call.append(prepare)

    def call_seed(self, *keys: object, seed: int | None = None) -> CallInt:
        """A seed per denoiser call from ``seed`` (else the surgery's, else 0), ``keys`` and the step.

        Like :meth:`generator` keyed by ``(*keys, step_index, timestep)`` at every call, but as a
        :class:`~attnsurgery.rng.CallInt` tensor that compiled graphs read without hashing or recompiling;
        draw with :func:`attnsurgery.rng.seeded_randint`.
        """
        base = seed if seed is not None else (self.seed if self.seed is not None else 0)
        context = self.context
        call_seed = CallInt(lambda: keyed_seed(base, *keys, context.step_index, context.timestep))
        self.per_call(call_seed.refresh)
        return call_seed

    # ----------------------------------------------------------------------------------------------
    def _prepare_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Denoiser pre-hook after the clock: the plugins' per-call choices (see :meth:`per_call`)."""
        for prepare in self._per_call:
            prepare()

    def _install_clock(self) -> None:
        """The step clock, before it the check that our processors are still in place, after it the plugins'
        per-call choices."""
        pipeline = self.pipeline
        hook = make_clock_hook(self.context, self.denoiser, lambda: getattr(pipeline, "scheduler", None))
        self.add_hook(self.denoiser, self._prepare_call, pre=True, with_kwargs=True, prepend=True)
        self.add_hook(self.denoiser, hook, pre=True, with_kwargs=True, prepend=True)
        self.add_hook(self.denoiser, self._check_processors, pre=True, with_kwargs=True, prepend=True)

    def _check_processors(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Denoiser pre-hook: raise if a processor we installed was replaced since apply (one identity check
        per layer), instead of letting the plugins silently stop acting there."""
        stack = _ACTIVE.get(self.denoiser, [])
        replaced = []
        for path, (layer, _) in self._installed.items():
            # a surgery stacked on ours wraps our processor: the newest installer's is the one to find
            newest = next(s._installed[path][1] for s in reversed(stack) if path in s._installed)
            if layer.processor is not newest:
                replaced.append((path, layer.processor))
        if replaced:
            path, processor = replaced[0]
            more = f" (and {len(replaced) - 1} more layers)" if len(replaced) > 1 else ""
            names = ", ".join(type(p).__name__ for p in self.plugins)
            raise RuntimeError(
                f"the attention processor that attnsurgery installed at {path}{more} was replaced after apply by "
                f"{type(processor).__name__} ({_replaced_by(processor)}), so {names} no longer act there. Call "
                "handle.remove() (it keeps the processors set since) and apply the plugins again after that call."
            )

    def remove(self) -> None:
        """Undo every recorded change in reverse order. Idempotent.

        Raises:
            RuntimeError: a surgery applied later to the same denoiser is still active (remove it first,
                or call ``attnsurgery.remove(target)`` to remove all of them in order).
        """
        if self._removed:
            return
        stack = _ACTIVE.get(self.denoiser, [])
        later = stack[stack.index(self) + 1 :] if self in stack else []
        if later:
            raise RuntimeError(
                f"{len(later)} surgery(ies) applied later to this denoiser are still active; remove them first "
                "or call attnsurgery.remove(target) to undo all of them in reverse order"
            )
        errors = []
        for site, _, undo in reversed(self._undo):
            try:
                undo()
            except Exception as error:  # keep undoing the rest; report at the end
                errors.append(f"{site}: {error!r}")
        self._undo.clear()
        self._claims.clear()
        self._installed.clear()
        self._per_call.clear()
        self.context.reset()
        forget_compiled_code(self.denoiser)
        self._removed = True
        if self in stack:
            stack.remove(self)
        if errors:
            raise RuntimeError("some changes could not be undone:\n" + "\n".join(errors))


def active_surgeries(target: Any) -> list[Surgery]:
    """Surgeries currently applied to ``target``'s denoiser, oldest first."""
    _, denoiser = resolve_target(target)
    return list(_ACTIVE.get(denoiser, []))


def _check_plugins(plugins: tuple[Any, ...]) -> None:
    from .plugins.base import Plugin

    for plugin in plugins:
        if isinstance(plugin, type) and issubclass(plugin, Plugin):
            raise TypeError(f"pass a plugin instance, e.g. {plugin.__name__}(), not the class {plugin.__name__}")
        if not isinstance(plugin, Plugin):
            raise TypeError(f"{plugin!r} is not an attnsurgery plugin (expected e.g. attnsurgery.HiDiffusion())")


def apply(target: Any, *plugins: Plugin, seed: int | None = None) -> Surgery:
    """Apply plugins to a pipeline or denoiser; returns the handle that undoes them.

    Plugins attach in the order given; each one that wraps processors wraps what is there, so the last
    plugin's wrapper is the outermost. If any plugin fails to attach, everything done so far is undone.
    A second ``apply`` on the same target stacks on the first (conflicting claims raise ``ValueError``).

    Args:
        target: a diffusers pipeline, or a UNet2DConditionModel / SD3Transformer2DModel / FluxTransformer2DModel.
        *plugins: plugin instances such as ``HiDiffusion()``.
        seed: seed for plugins' private random choices (a plugin's own ``seed`` wins).

    Example (the 2048 px image is not generated when the examples run as tests: minutes on a CPU):
        >>> handle = attnsurgery.apply(pipe, attnsurgery.HiDiffusion())
        >>> image = pipe("a castle", height=2048, width=2048).images[0]  # doctest: +SKIP
        >>> handle.remove()
    """
    _check_plugins(plugins)
    surgery = Surgery(target, tuple(plugins), seed)
    _ACTIVE.setdefault(surgery.denoiser, []).append(surgery)
    try:
        surgery._install_clock()
        for plugin in plugins:
            plugin.attach(surgery)
    except BaseException:
        surgery.remove()
        raise
    forget_compiled_code(surgery.denoiser)
    logger.info("attnsurgery: applied %s", surgery)
    return surgery


def remove(target: Any) -> int:
    """Undo every surgery on ``target`` (newest first); returns how many were removed."""
    surgeries = active_surgeries(target)
    for surgery in reversed(surgeries):
        surgery.remove()
    return len(surgeries)


@contextlib.contextmanager
def patched(target: Any, *plugins: Plugin, seed: int | None = None) -> Iterator[Surgery]:
    """Context manager: plugins are active inside the block and removed on exit, even on an exception.

    Example:
        >>> with attnsurgery.patched(pipe, attnsurgery.PerturbedAttention(scale=3.0)):
        ...     image = pipe("a castle").images[0]
    """
    surgery = apply(target, *plugins, seed=seed)
    try:
        yield surgery
    finally:
        surgery.remove()
