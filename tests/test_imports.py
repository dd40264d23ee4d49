"""The package's import graph: every module imports on its own, and no module imports from a layer above it.

Python runs ``attnsurgery/__init__.py`` before any submodule, and that face imports nearly everything in one
fixed order, which hides a cycle that another order reaches (``plugins.perturbation`` imported before
``headhunter`` once failed this way). So each module is imported in a fresh child process with the face left
out, only its own imports running; the face itself is one of the modules. Third-party libraries take no part
in the package's import order, so the driver loads the ones the package imports once and forks a child per
module from it. No module is skipped: ``comfy/`` imports ComfyUI only inside functions.

The layer rule reads every import statement with ``ast``, those inside functions and ``TYPE_CHECKING`` blocks
too: a type-only import is still a dependency on the layer that defines the type.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import attnsurgery

PACKAGE = "attnsurgery"
ROOT = Path(attnsurgery.__file__).parent

#: Bottom to top: a module may import from its own layer and the layers below. Entries are the first name
#: under ``attnsurgery`` (a module or a subpackage); "" is the package face ``attnsurgery/__init__.py``.
LAYERS = (
    ("foundation", ("families", "context", "inventory", "selectors", "training", "rng")),
    # The offline reference world (shapes data, evaluator, trainer, small models): it needs only training,
    # and pipelines, headhunter, cli and testing load it.
    ("reference world", ("reference",)),
    ("ops", ("ops",)),
    ("processors", ("processors",)),
    ("technique engines", ("perturbation",)),
    # surgery.py checks plugins against plugins.base.Plugin, and every plugin attaches through the surgery.
    ("techniques", ("surgery", "plugins", "convfusion")),
    ("applications", ("pipelines", "headhunter", "distill")),
    # testing/ (tiny offline pipelines for the tests and benchmarks) is imported by no module of the package.
    ("front ends", ("cli", "comfy", "testing", "__main__", "")),
)

#: Upward imports that exist and are to be removed, each with its reason; an entry that no longer holds fails.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def _modules() -> list[str]:
    def fail(name: str) -> None:
        raise ImportError(f"pkgutil.walk_packages could not import package {name}")

    found = [m.name for m in pkgutil.walk_packages(attnsurgery.__path__, PACKAGE + ".", onerror=fail)]
    return [PACKAGE, *found]


MODULES = _modules()


def _source(name: str) -> Path:
    path = ROOT.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(name: str) -> list[tuple[str, tuple[str, ...], int]]:
    """(absolute module, imported names, line) of every import statement, in functions and TYPE_CHECKING too."""
    path = _source(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([module] if module else []))
            found.append((module, tuple(alias.name for alias in node.names), node.lineno))
    return found


def _layer(name: str) -> int:
    head = name.split(".")[1] if "." in name else ""
    for rank, (_, members) in enumerate(LAYERS):
        if head in members:
            return rank
    raise LookupError(f"{name} belongs to no layer: add {head!r} to LAYERS in {Path(__file__).name}")


def _package_targets(module: str, names: tuple[str, ...]) -> list[str]:
    """The package modules an import reaches: ``from . import cli_cmd`` names a module, not an attribute."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return []
    submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return submodules or [module]


def test_every_module_has_a_layer():
    missing = []
    for name in MODULES:
        try:
            _layer(name)
        except LookupError as error:
            missing.append(str(error))
    assert not missing, "\n".join(missing)


def test_no_module_imports_from_a_higher_layer():
    upward, seen = [], set()
    for name in MODULES:
        for module, names, line in _imports(name):
            for target in _package_targets(module, names):
                if _layer(target) <= _layer(name):
                    continue
                seen.add((name, target))
                if (name, target) not in KNOWN_UPWARD:
                    upward.append(
                        f"{name} (layer {LAYERS[_layer(name)][0]!r}) imports {target} "
                        f"(layer {LAYERS[_layer(target)][0]!r}) at line {line}"
                    )
    assert not upward, "upward imports:\n" + "\n".join(upward)
    stale = [f"{a} no longer imports {b}: remove the entry" for a, b in KNOWN_UPWARD if (a, b) not in seen]
    assert not stale, "\n".join(stale)


_DRIVER = textwrap.dedent(
    """
    import importlib, importlib.util, json, os, sys, traceback
    from importlib.machinery import ModuleSpec

    package, root, preload, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
    for module, attributes in preload:  # third-party code the package imports; optional ones may be missing
        try:
            loaded = importlib.import_module(module)
            for attribute in attributes:
                if not hasattr(loaded, attribute):
                    importlib.import_module(f"{module}.{attribute}")
        except Exception:
            pass


    def import_alone(name):
        if name != package:  # leave the face out: a bare package object whose submodules can be found
            spec = ModuleSpec(package, None, is_package=True)
            spec.submodule_search_locations = [root]
            sys.modules[package] = importlib.util.module_from_spec(spec)
        if name.endswith(".__main__"):  # an entry point runs the command line when imported
            sys.argv = [name, "--help"]
        try:
            importlib.import_module(name)
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise


    failures = {}
    for name in names:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            try:
                import_alone(name)
                message = ""
            except BaseException:
                message = traceback.format_exc()
            with os.fdopen(write, "w") as pipe:
                pipe.write(message)
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            message = pipe.read()
        status = os.waitpid(pid, 0)[1]
        if message or status:
            failures[name] = message or f"the child died with wait status {status}"
    print(json.dumps(failures))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="each module is imported in a forked child: needs os.fork")
def test_every_module_imports_alone():
    third_party = {}
    for name in MODULES:
        for module, names, _ in _imports(name):
            if module and not _package_targets(module, names):
                third_party.setdefault(module, set()).update(n for n in names if n != "*")
    preload = json.dumps(sorted((module, sorted(names)) for module, names in third_party.items()))
    path = os.pathsep.join(filter(None, (str(ROOT.parent), os.environ.get("PYTHONPATH"))))
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, PACKAGE, str(ROOT), preload, *MODULES],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "modules that do not import on their own:\n\n" + "\n".join(
        f"{name}:\n{message}" for name, message in failures.items()
    )
