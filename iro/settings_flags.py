"""Command-line flags generated from a pydantic-settings model: one flag per field, its help the
field's docstring, its bounds and choices from the field's type, so a setting cannot exist without
its flag.

    command = settings_command(ServerSettings, run)   # run(settings) after parsing
    app.command("serve")(command)

A flag left out keeps the field's environment variable (`IRO_<FIELD>`) or default: flags are
passed to the model as init arguments, which pydantic-settings ranks above the environment.
Flag names are `--field-name` (`--field-name/--no-field-name` for a bool); a field may name its
own with `json_schema_extra={"flag": "--enforce-eager/--compile"}`. A list or dict field takes
JSON, unless the field decodes text itself (`NoDecode`).
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import annotated_types
import typer
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import NoDecode


def flag_decls(name: str, field: FieldInfo) -> str:
    """`--field-name`, `--field-name/--no-field-name` for a bool, or the field's own `flag`."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if extra.get("flag"):
        return str(extra["flag"])
    flag = "--" + name.replace("_", "-")
    return f"{flag}/--no-{flag[2:]}" if _base_type(field.annotation) is bool else flag


def flag_name(name: str, field: FieldInfo) -> str:
    """The flag that sets `name` (its first spelling)."""
    return flag_decls(name, field).split("/")[0]


def _base_type(annotation: Any) -> Any:
    """`X` of `X | None` / `Optional[X]`; the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _takes_json(field: FieldInfo) -> bool:
    return typing.get_origin(_base_type(field.annotation)) in (list, dict) and NoDecode not in field.metadata


def _cli_type(field: FieldInfo) -> Any:
    """The type typer parses the flag as: the field's own for scalars and choices (`Literal`), text
    for the rest (secrets, lists, dicts), which the model validates."""
    base = _base_type(field.annotation)
    if typing.get_origin(base) is Literal or base in (bool, int, float, str, Path):
        return base
    return str


_BOUNDS = {annotated_types.Ge: ("ge", ">="), annotated_types.Gt: ("gt", ">"), annotated_types.Le: ("le", "<="),
           annotated_types.Lt: ("lt", "<"), annotated_types.MultipleOf: ("multiple_of", "a multiple of")}


def _bounds(field: FieldInfo) -> str:
    """The field's bounds in words, e.g. ">= 16, a multiple of 16"."""
    return ", ".join(f"{word} {getattr(meta, attr)}" for meta in field.metadata
                     for kind, (attr, word) in _BOUNDS.items() if isinstance(meta, kind))


def flag_help(name: str, field: FieldInfo, env_prefix: str) -> str:
    """The field's description, then its bounds, default and environment variable."""
    text = " ".join((field.description or "").split())
    extras = [b for b in [_bounds(field)] if b]
    if _takes_json(field):
        extras.append("JSON")
    if not field.is_required():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel | SecretStr) or default is None:
            default = "unset" if default is None else "see the text"
        elif isinstance(default, (list, dict)):
            default = json.dumps(default) if default else "none"
        extras.append(f"default {default}")
    extras.append(f"env {env_prefix}{name.upper()}")
    return f"{text} ({'; '.join(extras)})"


def settings_command(settings_cls: type[BaseModel], run: Callable[[Any], Any], doc: str) -> Callable[..., Any]:
    """A typer command with one flag per field of `settings_cls`; it builds the settings from the
    flags given (over the environment) and calls `run(settings)`. A value the model refuses is a
    usage error naming the flag."""
    env_prefix = settings_cls.model_config.get("env_prefix", "")
    params = []
    for name, field in settings_cls.model_fields.items():
        option = typer.Option(None, flag_decls(name, field), help=flag_help(name, field, env_prefix),
                              show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[_cli_type(field)]))

    def command(**flags):
        return run(build_settings(settings_cls, flags))

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    return command


def build_settings(settings_cls: type[BaseModel], flags: dict[str, Any]) -> Any:
    """`settings_cls` from the flags given (None: not given), over its environment variables."""
    fields = settings_cls.model_fields
    given = {}
    for name, value in flags.items():
        if value is None:
            continue
        if _takes_json(fields[name]):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise typer.BadParameter(f"not JSON: {exc}", param_hint=flag_name(name, fields[name])) from None
        given[name] = value
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        hint = flag_name(name, fields[name]) if name in fields else "--" + name.replace("_", "-")
        raise typer.BadParameter(f"{error['msg']} (got {error.get('input')!r})", param_hint=hint) from None
