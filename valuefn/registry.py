"""The value registry on disk, shared by the server (reader) and the trainer (writer).

    VALUES_DIR/<name>/v0001/{manifest.json, adapter.safetensors, head.safetensors}
    VALUES_DIR/<name>/CURRENT          # "v0003\n": the version readers should serve

Publishing writes a temp dir, fsyncs every file, renames it to the next free version, then
replaces CURRENT atomically (temp file + fsync + rename), so a reader never sees half a
checkpoint. Names and versions are validated: nothing outside VALUES_DIR is ever touched.

    >>> import tempfile; reg = Registry(tempfile.mkdtemp())
    >>> reg.names()
    []
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from valuefn.checkpoint import FORMAT_VERSION, MANIFEST, CheckpointError, ChainLink, Manifest, read_manifest, sha256_file

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: `$` would also match before a final newline
VERSION_RE = re.compile(r"\Av([0-9]{4,9})\Z")
SPEC_VERSION_RE = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses
CURRENT = "CURRENT"


class RegistryError(Exception):
    """Bad name/version or a registry operation that cannot be done."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


def validate_name(name: str, param: str = "value") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise RegistryError(f"invalid {param} name {name!r} (letters, digits, '.', '_', '-'; at most 64)", param=param)
    return name


def parse_spec(spec: str, param: str = "value") -> tuple[str, int | None]:
    """`"name"` -> (name, None); `"name@3"` -> (name, 3)."""
    name, sep, version = spec.partition("@")
    validate_name(name, param)
    if not sep:
        return name, None
    if not SPEC_VERSION_RE.fullmatch(version) or int(version) < 1:
        raise RegistryError(f"invalid version in {spec!r} (expected name@N with N >= 1)", param=param)
    return name, int(version)


def vdir(version: int) -> str:
    return f"v{version:04d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Registry:
    """A registry of versioned checkpoints. The base class holds values (with their chains);
    subclasses override the hooks below for other kinds (valuefn.policies: policy adapters)."""

    kind = "value"
    """What the entries are, in messages and error params."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    # ------------------------------------------------------------------ hooks (values: chains)
    def _read_manifest(self, directory: Path):
        return read_manifest(directory)

    def _verify_files(self, directory: Path, manifest) -> None:
        from valuefn.checkpoint import verify_files

        verify_files(directory, manifest)

    def _finalise(self, base: dict, name: str, version: int, files: dict[str, str], previous: int | None,
                  beta: float) -> dict:
        """The manifest of the new version (validated); `previous` is the version it extends."""
        chain = [link.model_dump() for link in self.manifest(name, previous).chain] if previous else []
        chain.append(ChainLink(version=version, beta=beta).model_dump())
        final = base | {"format_version": base.get("format_version", FORMAT_VERSION), "name": name,
                        "version": version, "chain": chain, "files": files}
        Manifest.model_validate(final)
        return final

    def _protected(self, name: str, current: int | None) -> set[int]:
        """Versions `remove_old` must keep besides CURRENT (a value's chain)."""
        return {link.version for link in self.manifest(name, current).chain} if current else set()

    # ------------------------------------------------------------------ reading
    def _name_dir(self, name: str) -> Path:
        path = self.root / validate_name(name, self.kind)
        root = self.root.resolve()
        if path.exists() and root not in path.resolve().parents:
            raise RegistryError(f"{self.kind} {name!r} points outside the registry", param=self.kind)
        return path

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for p in self.root.iterdir():
            if not (NAME_RE.fullmatch(p.name) and p.is_dir()):
                continue
            try:
                if self.versions(p.name):
                    names.append(p.name)
            except RegistryError:  # a symlink leading outside the registry: never listed nor served
                continue
        return sorted(names)

    def versions(self, name: str) -> list[int]:
        d = self._name_dir(name)
        if not d.is_dir():
            return []
        root = self.root.resolve()
        return sorted(int(m.group(1)) for p in d.iterdir()
                      if (m := VERSION_RE.fullmatch(p.name)) and p.is_dir() and root in p.resolve().parents)

    def current(self, name: str) -> int | None:
        """The version CURRENT names (None if there is no usable CURRENT)."""
        try:
            text = (self._name_dir(name) / CURRENT).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            versions = self.versions(name)
            return versions[-1] if versions else None
        m = VERSION_RE.fullmatch(text) or re.fullmatch(r"([0-9]{1,9})", text)
        return int(m.group(1)) if m else None

    def path(self, name: str, version: int) -> Path:
        d = self._name_dir(name) / vdir(version)
        root = self.root.resolve()
        if d.exists() and root not in d.resolve().parents:
            raise RegistryError(f"{name}@{version} points outside the registry", param=self.kind)
        return d

    def resolve(self, spec: str) -> tuple[str, int]:
        """`name` or `name@N` -> (name, version) that exists on disk."""
        name, version = parse_spec(spec, param=self.kind)
        if version is None:
            version = self.current(name)
            if version is None:
                raise RegistryError(f"{self.kind} {name!r} has no published version", param=self.kind)
        if not self.path(name, version).is_dir():
            raise RegistryError(f"{self.kind} {name}@{version} does not exist", param=self.kind)
        return name, version

    def manifest(self, name: str, version: int) -> Manifest:
        return self._read_manifest(self.path(name, version))

    # ------------------------------------------------------------------ writing
    def publish(self, name: str, write: Callable[[Path], dict[str, str]], manifest: Manifest | dict,
                *, extend_chain: bool = False, beta: float = 1.0, make_current: bool = True) -> int:
        """Publish a new version of `name` and return its number.

        `write(tmpdir)` writes the checkpoint files and returns {file: sha256}. With
        `extend_chain`, the chain is the current version's chain + this version.
        """
        validate_name(name, self.kind)
        name_dir = self._name_dir(name)
        name_dir.mkdir(parents=True, exist_ok=True)
        base = manifest.model_dump() if isinstance(manifest, BaseModel) else dict(manifest)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=name_dir))
        try:
            files = write(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; servers may run as another user
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            previous = self.current(name) if extend_chain else None
            while True:  # claim the next free version number; rename fails if another writer won it
                version = max(self.versions(name), default=0) + 1
                final = self._finalise(base, name, version, files, previous, beta)
                _write_durable(tmp / MANIFEST, json.dumps(final, indent=2).encode())
                _fsync_dir(tmp)
                try:
                    os.rename(tmp, name_dir / vdir(version))
                    break
                except OSError:
                    if not (name_dir / vdir(version)).exists():
                        raise
            _fsync_dir(name_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            self.set_current(name, version)
        return version

    def set_current(self, name: str, version: int) -> None:
        """Atomically point CURRENT at an existing version (used by publish and rollback)."""
        name_dir = self._name_dir(name)
        if not self.path(name, version).is_dir():
            raise RegistryError(f"{self.kind} {name}@{version} does not exist", param="version")
        fd, tmp = tempfile.mkstemp(prefix=".CURRENT-", dir=name_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(f"{vdir(version)}\n".encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name_dir / CURRENT)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(name_dir)

    def rollback(self, name: str) -> int:
        """Point CURRENT at the newest version older than the current one; return it."""
        current = self.current(name)
        older = [v for v in self.versions(name) if current is None or v < current]
        if not older:
            raise RegistryError(f"{self.kind} {name!r} has no version before v{current}", param=self.kind)
        self.set_current(name, older[-1])
        return older[-1]

    def remove_old(self, name: str, keep: int = 3) -> list[int]:
        """Delete all but the newest `keep` versions (never CURRENT or anything in its chain)."""
        current = self.current(name)
        protected = {current} | self._protected(name, current)
        versions = self.versions(name)
        doomed = [v for v in versions[:-keep] if v not in protected] if keep > 0 else []
        for v in doomed:
            shutil.rmtree(self.path(name, v))
        return doomed

    def verify(self, name: str, version: int) -> Manifest:
        """Read the manifest and check every file's hash (no model is built)."""
        d = self.path(name, version)
        m = self._read_manifest(d)
        if m.name != name or m.version != version:
            raise CheckpointError(f"{d}: manifest says {m.name}@{m.version}", reason="bad_manifest", path=d)
        self._verify_files(d, m)
        return m


__all__ = ["Registry", "RegistryError", "parse_spec", "validate_name", "vdir", "sha256_file"]
