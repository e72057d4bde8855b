"""The registry in a local folder (or a shared file system):

    ROOT/<name>/v0001/{manifest.json, the version's files}
    ROOT/<name>/CURRENT          # "v0003\\n": the version readers should serve

Publishing writes a temp dir, fsyncs every file, renames it to the next free version (a racing
writer's rename fails and it takes the next number), then replaces CURRENT atomically (temp
file + fsync + rename), so a reader never sees half a checkpoint. Names and versions are
validated and symlinks leading out are refused: nothing outside ROOT is ever touched. Changes
are seen through watchfiles.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from registry.store import Reconcile, Store
from registry.errors import RegistryError
from registry.manifest import MANIFEST
from registry.names import CURRENT, NAME_RE, VERSION_RE, validate_name, vdir

log = logging.getLogger(__name__)


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


class LocalStore(Store):
    """Versions in folders under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.location = str(self.root)
        self.last_error = None

    def _name_dir(self, name: str) -> Path:
        path = self.root / validate_name(name, self.kind)
        root = self.root.resolve()
        if path.exists() and root not in path.resolve().parents:
            raise RegistryError(f"{self.kind} {name!r} points outside the registry", param=self.kind)
        return path

    # ------------------------------------------------------------------ reading
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

    def read_current(self, name: str) -> str | None:
        try:
            return (self._name_dir(name) / CURRENT).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def version_dir(self, name: str, version: int) -> Path:
        d = self._name_dir(name) / vdir(version)
        root = self.root.resolve()
        if d.exists() and root not in d.resolve().parents:
            raise RegistryError(f"{name}@{version} points outside the registry", param=self.kind)
        return d

    def exists(self, name: str, version: int) -> bool:
        return self.version_dir(name, version).is_dir()

    # ------------------------------------------------------------------ writing
    def publish(self, name: str, write: Callable[[Path], dict[str, str]],
                finalise: Callable[[int, dict[str, str]], dict]) -> int:
        name_dir = self._name_dir(name)
        name_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=name_dir))
        try:
            files = write(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; servers may run as another user
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            while True:  # claim the next free version number; rename fails if another writer won it
                version = max(self.versions(name), default=0) + 1
                final = finalise(version, files)
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
        return version

    def write_current(self, name: str, version: int, *, only_forward: bool = False) -> bool:
        name_dir = self._name_dir(name)
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
        return True

    def delete_version(self, name: str, version: int) -> None:
        shutil.rmtree(self.version_dir(name, version))

    # ------------------------------------------------------------------ watching
    async def watch(self, reconcile: Reconcile, stop: asyncio.Event, what: str) -> None:
        """Reconcile now and on every change under the folder (watchfiles); a folder that is missing
        or vanishes is waited for (and reported by `last_error`), not an error."""
        from watchfiles import awatch

        while not stop.is_set():
            await _reconcile_logged(reconcile, what)
            if not self.root.is_dir():
                if self.last_error is None:
                    log.warning("%s %s is not a folder; waiting for it", what, self.root)
                self.last_error = f"{self.root} is not a folder"
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            self.last_error = None
            try:
                async for _ in awatch(self.root, stop_event=stop, debounce=50, step=20, recursive=True,
                                      rust_timeout=1000, yield_on_timeout=True):
                    await _reconcile_logged(reconcile, what)
                    if not self.root.is_dir():
                        break
            except (FileNotFoundError, RuntimeError, OSError) as exc:
                self.last_error = f"watching {self.root} failed: {exc}"
                log.warning("%s watch interrupted (%s); retrying", what, exc)


async def _reconcile_logged(reconcile: Reconcile, what: str) -> None:
    """One reconcile; a failure is logged with its traceback and the watch goes on."""
    try:
        await reconcile()
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the watcher must outlive any one reconcile
        log.exception("%s: reconcile failed; the watch goes on", what)


__all__ = ["LocalStore"]
