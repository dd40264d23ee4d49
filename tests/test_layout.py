"""The test tree's shape: tests mirror the package, and no test imports another test module or a conftest.

``tests/<area>/test_*.py`` holds the tests of ``attnsurgery/<area>/`` (sub-areas nest the same way);
``tests/core/`` holds those of the package's top-level modules (``surgery``, ``context``, ``families``, ...)
and ``tests/examples/`` runs the scripts in ``examples/``. The top level keeps only the checks of the whole
package listed in ``TOP_LEVEL``. Shared helpers live in ``tests/support/`` (no tests there); fixtures live in
conftest files, which pytest loads by itself, so nothing ever imports a conftest. Every test folder is a
package (``__init__.py``), so modules of the same name in two folders do not clash.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import attnsurgery

TESTS = Path(__file__).resolve().parent
PACKAGE = Path(attnsurgery.__file__).resolve().parent
AREAS_WITHOUT_A_PACKAGE = {"core", "examples"}  # the package's top-level modules; the examples/ scripts
TOP_LEVEL = {"test_imports.py", "test_layout.py", "test_doctests.py"}  # checks of the whole package
SUPPORT = "support"


def python_files() -> list[Path]:
    return sorted(path for path in TESTS.rglob("*.py") if "__pycache__" not in path.parts)


def forbidden_imports(source: str) -> list[str]:
    """The imports in ``source`` that reach a ``test_*`` module or a conftest (absolute or relative)."""

    def bad(dotted: str) -> bool:
        return any(part.startswith("test_") or part == "conftest" for part in dotted.split(".") if part)

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if bad(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if bad(module):
                found.append(module)
            elif node.level or module.split(".")[0] == "tests":  # `from tests.core import test_surgery`
                found += [f"{module}.{alias.name}".replace("..", ".") for alias in node.names if bad(alias.name)]
    return found


@pytest.mark.parametrize(
    "source",
    [
        "from tests.conftest import run_pipe",
        "from .conftest import run_pipe",
        "from . import conftest",
        "from tests.core.test_surgery import state_of",
        "from tests.core import test_surgery",
        "from .test_surgery import state_of",
        "import tests.test_imports",
        "def f():\n    from tests.plugins.test_agent import helper\n",
    ],
)
def test_the_import_rule_catches(source):
    assert forbidden_imports(source)


def test_the_import_rule_allows_support_and_the_package():
    source = "from tests.support.pipes import run_pipe\nfrom attnsurgery.testing import tiny\nimport pytest\n"
    assert forbidden_imports(source) == []


def test_nothing_imports_a_test_module_or_a_conftest():
    offenders = {
        str(path.relative_to(TESTS)): found for path in python_files() if (found := forbidden_imports(path.read_text()))
    }
    assert not offenders, f"move what these import into tests/{SUPPORT}/ (fixtures into a conftest): {offenders}"


def test_every_test_module_lives_in_an_area_of_the_package():
    misplaced = []
    for path in TESTS.rglob("test_*.py"):
        folders = path.relative_to(TESTS).parts[:-1]
        if not folders:
            ok = path.name in TOP_LEVEL
        elif folders[0] in AREAS_WITHOUT_A_PACKAGE:
            ok = len(folders) == 1
        else:
            ok = folders[0] != SUPPORT and (PACKAGE.joinpath(*folders) / "__init__.py").is_file()
        if not ok:
            misplaced.append(str(path.relative_to(TESTS)))
    assert not misplaced, (
        f"{misplaced}: put tests of attnsurgery/<area>/ in tests/<area>/, of the top-level "
        f"modules in tests/core/; the top level holds only {sorted(TOP_LEVEL)}"
    )


def test_every_test_folder_is_a_package():
    folders = {path.parent for path in python_files()}
    missing = sorted(
        str(folder.relative_to(TESTS.parent)) for folder in folders if not (folder / "__init__.py").is_file()
    )
    assert not missing, f"add an __init__.py to {missing} (module names must not clash across folders)"
