"""Imports flow downward only: iro, bench -> trainer -> clients -> server -> valuefn -> registry -> common.

Every module of the project's packages is parsed (not imported) and each `import` it contains,
lazy ones inside functions included, is checked against what its layer may import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("common", "registry", "valuefn", "server", "clients", "trainer", "bench", "iro")

MAY_IMPORT = {
    "common": {"common"},
    "registry": {"common", "registry"},  # versioned, verified checkpoints in a folder or object storage
    "valuefn": {"common", "registry", "valuefn"},
    "server": {"common", "registry", "valuefn", "server"},
    "clients": {"common", "clients"},  # a client needs no server to talk to one
    "trainer": {"common", "registry", "valuefn", "clients", "trainer"},
    "bench": set(PROJECT),  # the top: benchmarks and the command line wire everything together
    "iro": set(PROJECT),
}

def modules() -> list[Path]:
    return sorted(p for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py"))


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import of a project package in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative: stays inside the importing package
            continue
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PROJECT]
    return found


def violations(allow: set[tuple[str, str]] = frozenset()) -> list[str]:
    bad = []
    for path in modules():
        layer = path.relative_to(ROOT).parts[0]
        for line, name in project_imports(path):
            if name.split(".")[0] not in MAY_IMPORT[layer] and (layer, name) not in allow:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({layer} may import "
                           f"{', '.join(sorted(MAY_IMPORT[layer]))})")
    return bad


def test_every_package_is_parsed():
    found = {p.relative_to(ROOT).parts[0] for p in modules()}
    assert found == set(PROJECT)
    assert len(modules()) > 40


def test_imports_flow_downward_only():
    assert violations() == []


@pytest.mark.parametrize("source,layer,expected", [
    ("from server.engine import VllmEngine", "valuefn", 1),
    ("def f():\n    import trainer.loop", "clients", 1),  # lazy imports count too
    ("import common.paths, valuefn.model", "server", 0),
    ("from . import sibling\nimport torch", "common", 0),
])
def test_the_check_sees_what_it_should(tmp_path, monkeypatch, source, layer, expected):
    pkg = tmp_path / layer
    pkg.mkdir()
    (pkg / "mod.py").write_text(source)
    for other in PROJECT:
        (tmp_path / other).mkdir(exist_ok=True)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert len(violations()) == expected
