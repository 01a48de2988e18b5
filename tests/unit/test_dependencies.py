"""Every third-party module the runtime imports comes from a dependency pyproject.toml declares.

A plain `pip install .` must run every command: the test extra (which brings torch, and with it
jinja2) must never be what makes the runtime work."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ("kernels", "engine", "jobs", "cluster")


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string ('ray[default]>=2.40' -> 'ray')."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(r) for r in project["dependencies"]}


def _runtime_imports() -> dict[str, set[str]]:
    """Top-level module -> the runtime files importing it (at any depth: lazy imports count)."""
    found: dict[str, set[str]] = {}
    for folder in RUNTIME:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_runtime_imports_are_declared_dependencies():
    declared = _declared()
    distributions = importlib.metadata.packages_distributions()
    imports = _runtime_imports()
    third_party = {m: files for m, files in imports.items() if m not in sys.stdlib_module_names and m != "ternpool"}
    assert {"numpy", "numba", "pyarrow", "ray", "transformers"} <= set(third_party)  # the scan sees imports
    missing = []
    for module, files in sorted(third_party.items()):
        dists = {_name(d) for d in distributions.get(module, [])}
        if not dists:
            missing.append(f"{module} (imported by {sorted(files)}) is not installed here: no distribution provides it")
        elif not dists & declared:
            missing.append(f"{module} (imported by {sorted(files)}) comes from {sorted(dists)}, "
                           "which pyproject.toml's [project] dependencies do not declare")
    assert not missing, "add to pyproject.toml dependencies:\n" + "\n".join(missing)


def test_chat_templates_dependency_is_declared():
    """transformers' apply_chat_template (a `messages` column) needs jinja2, which transformers does not
    require: it must be ours, at least at the version transformers accepts."""
    declared = {_name(r): r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert "jinja2" in declared, "pyproject.toml must declare jinja2 (chat templates)"
    minimum = re.search(r">=\s*([0-9.]+)", declared["jinja2"])
    assert minimum and tuple(map(int, minimum.group(1).split("."))) >= (3, 1, 6), declared["jinja2"]
