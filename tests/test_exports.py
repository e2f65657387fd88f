"""Every module's ``__all__`` tells the truth (after websockets' test_exports).

Walks the source of both packages with ``ast``: every module has an ``__all__`` whose names
exist; a name one project module imports from another (``from positiond.x import y``) is in
``x.__all__``; no module imports another's private (``_name``) names — nor do the tests, the
benchmarks and the examples, but for the few listed in :data:`PRIVATE_IMPORTS_LEFT`.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"positiond": ROOT / "daemon" / "positiond",
            "positiond_client": ROOT / "client" / "positiond_client"}  # fmt: skip
OTHERS = [ROOT / "tests", ROOT / "bench", ROOT / "examples"]

# Private names the tests still import, each needing a change in a module another piece of work
# is rewriting right now (the engine's split, the client's rewrite). Remove them as those land.
PRIVATE_IMPORTS_LEFT: set[tuple[str, str, str]] = set()


def _module_name(path: Path) -> str:
    for package, root in PACKAGES.items():
        if path.is_relative_to(root):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise ValueError(path)


def _package_files() -> list[Path]:
    return sorted(p for root in PACKAGES.values() for p in root.rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, module, name) of each ``from <project module> import name`` in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".")[0] in PACKAGES
        ):
            for alias in node.names:
                yield node.lineno, node.module, alias.name


def _is_submodule(module: str, name: str) -> bool:
    """``from positiond.ctl import render`` imports a module, not a name of the package."""
    try:
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return False
    return True


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _all(module: ModuleType) -> list[str]:
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list | tuple), f"{module.__name__} has no __all__"
    return list(exported)


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: _module_name(p))
def test_every_module_lists_what_it_exports(path: Path) -> None:
    if path.name == "__main__.py":  # runs the program when imported: read, not imported
        tree = ast.parse(path.read_text())
        assert any(
            isinstance(node, ast.AnnAssign | ast.Assign) and "__all__" in ast.unparse(node)
            for node in tree.body
        ), f"{path} has no __all__"
        return
    module = importlib.import_module(_module_name(path))
    exported = _all(module)
    assert len(set(exported)) == len(exported), f"{module.__name__}.__all__ repeats a name"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{module.__name__}.__all__ names what it does not have: {missing}"
    assert not [name for name in exported if _private(name)]


def test_names_imported_across_modules_are_exported() -> None:
    wrong = []
    for path in _package_files():
        for line, module, name in _imports(path):
            if _is_submodule(module, name):
                continue
            if name not in _all(importlib.import_module(module)):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}.{name}")
    assert not wrong, "imported but not in the module's __all__:\n" + "\n".join(wrong)


def test_no_private_name_is_imported_across_modules() -> None:
    found = set()
    for path in _package_files() + sorted(p for d in OTHERS for p in d.rglob("*.py")):
        for _, module, name in _imports(path):
            if _private(name):
                found.add((str(path.relative_to(ROOT)), module, name))
    assert found == PRIVATE_IMPORTS_LEFT


def test_posctl_builds_no_op_of_its_own() -> None:
    """posctl's direct write applies the ops the engine builds (positiond.ops.operator_op), not
    copies: it imports no op class it would have to fill in by hand."""
    built_by_hand = {"QueryOp", "ResolveOp", "OrphansOp", "OrphanResolveOp", "PruneOp"}
    for path in sorted((PACKAGES["positiond"] / "ctl").glob("*.py")):
        names = {name for _, module, name in _imports(path) if module == "positiond.ops"}
        assert not names & built_by_hand, (path.name, names & built_by_hand)


def test_one_name_for_the_status_file() -> None:
    """The status file's name is said once (positiond.status); posctl reads it from there."""
    said = []
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == "status.json":
                said.append(_module_name(path))
    assert said == ["positiond.status"]


def test_posctl_reaches_the_database_through_the_store() -> None:
    """posctl opens no SQLite connection of its own and sets no PRAGMA that makes a writer: its
    read connection and its direct write come from positiond.store.sqlite."""
    for path in sorted((PACKAGES["positiond"] / "ctl").glob("*.py")):
        source = path.read_text()
        assert "sqlite3.connect(" not in source, path.name
        assert "journal_mode" not in source and "_setup" not in source, path.name
