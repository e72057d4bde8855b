"""Package data: every data file the packages read ships in a non-editable install."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_preset_and_task_file_is_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, globs in data.items():
        base = ROOT / package
        files = [p.relative_to(base).as_posix() for p in base.rglob("*")
                 if p.is_file() and p.suffix in (".yaml", ".yml", ".jsonl", ".json", ".txt") and "__pycache__" not in p.parts
                 and "tests" not in p.parts]
        shipped = {p.relative_to(base).as_posix() for g in globs for p in base.glob(g)}  # setuptools' glob rules
        missing = [f for f in files if f not in shipped]
        assert not missing, f"{package}: not in package-data: {missing}"
