"""`open_registry(location, Kind)`: the one place a registry location becomes a store.

    open_registry("~/.cache/iro/values", Registry)          # a local folder
    open_registry("s3://team-bucket/iro/values", Registry)  # S3 or any S3-compatible store

A `Path` built from an `s3://` URL (pathlib folds the `//`: `s3:/bucket/prefix`, which is what
typer and pydantic hand over for `--values-dir s3://...`) is read as the URL too.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, TypeVar

from registry.store import Store
from registry.errors import RegistryError

log = logging.getLogger(__name__)
S3_URL = re.compile(r"\As3:/{1,2}([^/]*)/*(.*?)/*\Z")
R = TypeVar("R", bound="BaseRegistry")  # registry.base imports this module: the bound stays a name


def is_object_store(location: str | Path | None) -> bool:
    """Whether `location` names an object store (`s3://...`) rather than a folder."""
    return location is not None and S3_URL.match(str(location)) is not None


def same_location(a: str | Path, b: str | Path) -> bool:
    """Whether two locations, as two processes report them, name the same registry: the same
    bucket and prefix, or the same folder once resolved."""
    ma, mb = S3_URL.match(str(a)), S3_URL.match(str(b))
    if ma or mb:
        return bool(ma and mb) and (ma.group(1), ma.group(2)) == (mb.group(1), mb.group(2))
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def open_store(location: str | Path | None, *, cache_dir: str | Path | None = None, poll_interval: float | None = None,
               client: Any = None) -> Store:
    """The store `location` names: `s3://bucket/prefix` (cached under `cache_dir`, CURRENT polled
    every `poll_interval` s, through boto3 `client`), else a local folder (watched through
    watchfiles; the object-store options do not apply to it)."""
    if location is None:
        raise RegistryError("no registry location given", param="registry")
    m = S3_URL.match(str(location))
    if m:
        from registry.s3 import DEFAULT_POLL_S, S3Store

        return S3Store(m.group(1), m.group(2), cache_dir=cache_dir, client=client,
                       poll_interval=DEFAULT_POLL_S if poll_interval is None else poll_interval)
    from registry.local import LocalStore

    return LocalStore(location)


def open_registry(location: str | Path | None, kind: type[R], *, create: bool = False, **options: Any) -> R:
    """A registry of `kind` (`valuefn.registry.Registry`, `registry.policies.PolicyRegistry`) at
    `location`: a folder, or `s3://bucket/prefix` (options: `cache_dir`, `poll_interval`, `client`;
    see `open_store`). With `create`, a missing local folder is made (a failure is logged: the
    watcher waits for the folder)."""
    registry = kind(store=open_store(location, **options))
    if create and not is_object_store(location):
        try:
            registry.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("cannot create the %s registry %s: %s", registry.kind, registry.root, exc)
    return registry


__all__ = ["is_object_store", "open_registry", "open_store", "same_location"]
