"""Presets and `--set` overrides: one loader and one parser for every trainer config.

A config is built from a preset (a YAML mapping, by name from a presets folder or by path), then
`KEY=VALUE` overrides, where dotted keys reach into nested sections (`model.lora_r=8`,
`train.model.lora_r=8`) and values are read as YAML scalars (`null`, `true`, `[1, 4]`).

    >>> nest({"epochs": 2, "model.lora_r": 8})
    {'epochs': 2, 'model': {'lora_r': 8}}
    >>> parse_override("bon=[1, 4]")
    ('bon', [1, 4])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def parse_value(text: Any) -> Any:
    """A command-line string read as a YAML scalar or list; anything else as it is."""
    if not isinstance(text, str) or not text.strip():
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` of a `--set` option as (key, parsed value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value.strip())


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, section by section (nested mappings merge, other values replace)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def nest(flat: dict[str, Any], text_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Dotted keys as nested sections, each value parsed as by `parse_value` except those of
    `text_keys` (names, where `null` or `yes` are text)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        extra: dict[str, Any] = {leaf: value if key in text_keys else parse_value(value)}
        for section in reversed(sections):
            extra = {section: extra}
        out = merge(out, extra)
    return out


def load_preset(preset: str, presets_dir: Path, what: str = "preset") -> dict[str, Any]:
    """The mapping of a preset by name (`presets_dir/NAME.yaml`) or of a YAML file by path."""
    path = presets_dir / f"{preset}.yaml"
    if not path.is_file():
        path = Path(preset).expanduser()
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in presets_dir.glob("*.yaml")))
            raise ValueError(f"unknown {what} {preset!r}; known: {known} (or a path to a YAML file)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of options")
    return data


def short_error(exc: ValidationError, what: str, hide: frozenset[str] = frozenset()) -> ValueError:
    """A pydantic error as one line per bad option: `model.lora_r: Input should be ... (got -1)`.
    `hide`: parts of an error's location that are no option (a tagged union's tags)."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"] if p not in hide)
        message = error["msg"].removeprefix("Value error, ")
        got = f" (got {error['input']!r})" if where and error["type"] != "missing" and "input" in error else ""
        lines.append(f"{where}: {message}{got}" if where else message)
    return ValueError(f"invalid {what}: " + "; ".join(lines))


__all__ = ["load_preset", "merge", "nest", "parse_override", "parse_value", "short_error"]
