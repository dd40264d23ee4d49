"""The exact-restore check: after ``remove()`` a pipeline must hold the very objects it held before.

For plugin authors as much as for our own tests: take a ``snapshot`` before ``apply``, and
``assert_restored`` after ``remove`` compares module identities and types, every attribute's identity,
child modules, parameters, hook tables and attention processors, component by component.

Example:
    >>> before = snapshot(pipe)
    >>> with surg.patched(pipe, MyPlugin()):
    ...     image = pipe("a red circle", num_inference_steps=2).images[0]
    >>> assert_restored(pipe, before)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PipelineState", "snapshot", "assert_restored"]

HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
)

#: ``{"modules": {"component:path": {...}}, "pipe": {attribute: id}}``
PipelineState = dict[str, dict[str, Any]]


def _components(pipe: Any) -> dict[str, Any]:
    if isinstance(pipe, torch.nn.Module):
        return {"denoiser": pipe}
    return dict(pipe.components)


def _module_entry(module: torch.nn.Module) -> dict[str, Any]:
    entry = {
        "id": id(module),
        "type": type(module),
        "dict": {k: id(v) for k, v in vars(module).items() if k not in HOOK_TABLES},
        "modules": {k: id(v) for k, v in module._modules.items()},
        "params": {k: id(v) for k, v in module._parameters.items()},
        "hooks": {t: dict(getattr(module, t, {})) for t in HOOK_TABLES},
    }
    if hasattr(module, "processor"):
        entry["processor"] = id(module.processor)
    return entry


def snapshot(pipe: Any) -> PipelineState:
    """Everything ``remove()`` must put back, for a diffusers pipeline or a bare denoiser.

    The pipeline's own per-call state (``_guidance_scale``, ``_num_timesteps``, ...) is left out: it is
    the pipeline's, not a plugin's.
    """
    modules = {}
    for name, component in _components(pipe).items():
        if isinstance(component, torch.nn.Module):
            modules.update({f"{name}:{path}": _module_entry(m) for path, m in component.named_modules()})
    public = (
        {} if isinstance(pipe, torch.nn.Module) else {k: id(v) for k, v in vars(pipe).items() if not k.startswith("_")}
    )
    return {"modules": modules, "pipe": public}


def assert_restored(pipe: Any, before: PipelineState) -> None:
    """Raise ``AssertionError`` naming the first thing that differs from ``before`` (a ``snapshot``)."""
    after = snapshot(pipe)
    for kind in ("pipe", "modules"):
        added = sorted(set(after[kind]) - set(before[kind]))
        missing = sorted(set(before[kind]) - set(after[kind]))
        if added or missing:
            raise AssertionError(f"{kind} not restored: added {added[:5]}, missing {missing[:5]}")
    for name, entry in before["pipe"].items():
        if after["pipe"][name] != entry:
            raise AssertionError(f"pipeline attribute {name!r} is another object after remove()")
    for path, entry in before["modules"].items():
        now = after["modules"][path]
        for field, value in entry.items():
            if now.get(field) != value:
                raise AssertionError(f"{path}: {field} not restored (before {value!r}, after {now.get(field)!r})")
