"""The package layering rules of DESIGN.md, checked on the source tree."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"shared_models": {"flwr", "client", "server"}, "client": {"server"}, "server": {"client"}}


def imported_top_levels(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_forbidden_imports(package):
    imports = imported_top_levels(package)
    bad = {name: sorted(files) for name, files in imports.items() if name in FORBIDDEN[package]}
    assert bad == {}, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"


@pytest.mark.parametrize("package", ["shared_models", "client", "server"])
def test_packages_resolve_to_this_repository(package):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == ROOT / package
