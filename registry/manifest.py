"""Reading a version folder's `manifest.json` and checking the files it lists, for every kind of
entry (values, policies): the manifest names a format version and a sha256 per file."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from common.hashing import sha256_file
from registry.errors import CheckpointError

MANIFEST = "manifest.json"


class VersionManifest(BaseModel):
    """What every version's manifest says of itself (a value's and a policy's add their own fields)."""

    format_version: int
    name: str
    version: int = Field(ge=1)
    created_at: float = Field(default_factory=time.time)


def safe_file_name(name: object) -> bool:
    """A file a manifest may list: a plain name inside its version folder (no path, no dot file)."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def read_manifest_json(directory: Path, max_format: int, what: str = "format") -> tuple[Path, dict, int]:
    """`directory`'s manifest.json as (path, mapping, format version), refusing a symlink, a missing
    or unreadable file, no format version, or a format newer than `max_format`."""
    path = directory / MANIFEST
    if path.is_symlink():  # everything a checkpoint reads lies inside its own folder
        raise CheckpointError(f"{path} is a symlink; refusing it", reason="bad_file", path=directory)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing", reason="missing_manifest", path=directory) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}", reason="bad_manifest", path=directory) from exc
    fmt = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(fmt, int):
        raise CheckpointError(f"{path} has no format_version", reason="bad_manifest", path=directory)
    if fmt > max_format:
        raise CheckpointError(f"{path} is {what} {fmt}; this version reads <= {max_format} (upgrade iro-serve)",
                              reason="future_format", path=directory)
    return path, raw, fmt


def validate_manifest(model, raw: dict, path: Path, directory: Path):
    """`raw` (read from `path`) as the pydantic `model`; a mismatch refuses the version as `bad_manifest`."""
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path} is invalid: {exc.errors()[0]['msg']}", reason="bad_manifest", path=directory) from exc


def verify_listed_files(directory: Path, files: dict[str, str], *, required: tuple[str, ...],
                        allowed: Callable[[str], bool], refusal: str) -> None:
    """The files a manifest lists (name -> sha256): the `required` ones listed, each one `allowed`,
    a plain file inside `directory` (no path, no symlink), and matching its sha256."""
    for name in required:
        if name not in files:
            raise CheckpointError(f"manifest of {directory} does not list {name}", reason="bad_manifest", path=directory)
    for name, digest in files.items():
        if not safe_file_name(name) or not allowed(name):
            raise CheckpointError(f"{directory}: refusing file {name!r} ({refusal})", reason="bad_file", path=directory)
        path = directory / name
        if path.is_symlink():
            raise CheckpointError(f"{path} is a symlink; refusing it", reason="bad_file", path=directory)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing", reason="missing_file", path=directory)
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} does not match its sha256 (corrupted or truncated)", reason="hash_mismatch",
                                  path=directory)


__all__ = ["MANIFEST", "read_manifest_json", "safe_file_name", "verify_listed_files"]
