"""The registry in S3-compatible object storage, read through a verified local cache.

    s3://BUCKET/PREFIX/<name>/v0001/.claim           # empty; created with If-None-Match: * (the number is taken)
    s3://BUCKET/PREFIX/<name>/v0001/<files>          # the version's files
    s3://BUCKET/PREFIX/<name>/v0001/manifest.json    # sha256 per file; written after the files
    s3://BUCKET/PREFIX/<name>/CURRENT                # "v0003\\n"; written last, with If-Match on its ETag

Publishing keeps the folder registry's guarantees without a rename: the publisher first claims a
version number with a conditional create of its `.claim` object (`If-None-Match: *`: of two
publishers only one creates it; the other takes the next number), uploads the files, then the
manifest (a version exists for readers once its manifest does), then moves CURRENT with a
compare-and-swap (`If-Match` on the ETag it read; a racing publisher's newer CURRENT is left in
place). A crashed publish leaves a claimed number without a manifest: never listed, never reused.
Deleting a version keeps its claim, so its number is never handed out again and a cached copy of
it elsewhere can never be mistaken for other content.

Each reader downloads the versions it uses into a cache folder (`$IRO_HOME/registry-cache/s3/
BUCKET/PREFIX` unless given), checking every file against the manifest's sha256 while it streams
and renaming the folder into place only when all match, so `path(name, version)` is a verified
local folder and loaders are unchanged. `watch` polls each name's CURRENT with a HEAD (its ETag)
every `poll_interval` seconds; `prune_cache(in_use)` drops the copies nothing uses.

The store is reached with boto3, any S3-compatible endpoint through the standard AWS settings
(`AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_S3`, the credentials chain, `~/.aws/config`). Why boto3 and
not s3fs/fsspec or obstore: the publish protocol needs S3's conditional writes (`IfNoneMatch`,
`IfMatch` on PutObject) and the precise error codes (412 vs 404 vs 5xx) to tell a lost race from an
outage; boto3 exposes them directly, is AWS's own maintained SDK (moto, the test store, is built
against it), and is already a dependency. s3fs hides them behind a file-system view (and pulls in
aiobotocore with its pinned botocore); obstore supports conditional puts but is young and adds a
Rust wheel for no gain here. One PUT per file: a file may be up to 5 GiB (adapters are MiBs).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from registry.store import Reconcile, Store
from registry.errors import CheckpointError, RegistryError, RegistryUnavailable
from registry.local import _fsync_dir, _reconcile_logged, _write_durable
from registry.manifest import MANIFEST, safe_file_name
from registry.names import CURRENT, NAME_RE, VERSION_RE, parse_current, vdir

log = logging.getLogger(__name__)
CLAIM = ".claim"
MANIFESTS = ".manifests"
"""Cache sub-folder of manifest-only copies (`manifest()` of versions not downloaded)."""
DEFAULT_POLL_S = 1.0
SHA256_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_RETRYABLE = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "ServiceUnavailable",
              "InternalError", "RequestTimeTooSkewed"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "AllAccessDisabled", "NoSuchBucket", "PermanentRedirect", "AuthorizationHeaderMalformed"}


def make_client(*, connect_timeout: float = 5.0, read_timeout: float = 30.0, max_attempts: int = 3):
    """A boto3 S3 client from the standard AWS settings (endpoint, region, credentials chain), with
    bounded timeouts and retries so an outage is reported in seconds, not minutes."""
    from botocore.config import Config

    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"max_attempts": max_attempts, "mode": "standard"})
    with _session_lock:  # a session is not thread-safe; its clients are (and share its loaded service models)
        return _session().client("s3", config=config)


_session_lock = threading.Lock()


@functools.cache
def _session():
    import boto3

    return boto3.session.Session()


def _status(exc) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")), int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _is_missing(exc) -> bool:
    code, status = _status(exc)
    return status == 404 or code in ("NoSuchKey", "404", "NotFound")


def _lost_race(exc) -> bool:
    """A conditional write that did not apply: the object exists (If-None-Match), its ETag changed
    (If-Match), or another conditional write to it was in progress (409)."""
    code, status = _status(exc)
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


class S3Store(Store):
    """Versions under `s3://bucket/prefix`, read through a verified local cache."""

    conditional_writes = True
    prune_grace_s = 300.0
    """A cached version used (`version_dir`) this recently is never pruned: a load may be reading it."""

    def __init__(self, bucket: str, prefix: str = "", *, cache_dir: str | Path | None = None,
                 poll_interval: float = DEFAULT_POLL_S, client: Any = None):
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket or ""):
            raise RegistryError(f"invalid bucket name {bucket!r} in s3://{bucket}/{prefix}", param="registry")
        if not poll_interval > 0:
            raise RegistryError(f"poll_interval must be > 0 s (got {poll_interval})", param="poll_interval")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if cache_dir is None:
            from common.paths import iro_home

            cache_dir = iro_home() / "registry-cache" / "s3" / bucket / (self.prefix or "_")
        self.root = Path(cache_dir).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the cache folder {self.root} for {self.location}: {exc}",
                                param="registry") from exc
        self.poll_interval = poll_interval
        self.client = client if client is not None else make_client()
        self.last_error = None
        self._current: dict[str, tuple[str, str]] = {}  # name -> (ETag, text) of CURRENT last read
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._used: dict[tuple[str, int], float] = {}

    # ------------------------------------------------------------------ requests
    def _key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts) if self.prefix else parts)

    def _call(self, op: str, **kw):
        """One S3 request. An outage (no connection, timeout, 5xx, throttling, denied, no bucket)
        raises RegistryUnavailable and marks the store unhealthy; a client error the caller can act
        on (404, 409, 412) is raised as botocore's ClientError; success marks the store healthy."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result = getattr(self.client, op)(Bucket=self.bucket, **kw)
        except BotoCoreError as exc:
            raise self._unavailable(f"cannot reach {self.location}: {exc}") from exc
        except ClientError as exc:
            code, status = _status(exc)
            if status >= 500 or code in _RETRYABLE:
                raise self._unavailable(f"{self.location} answered {status} {code}") from exc
            if code in _DENIED or status == 403:
                raise self._unavailable(f"{self.location} refused {op}: {code} ({exc})") from exc
            self._reachable()
            raise
        self._reachable()
        return result

    def _read_body(self, response, sink=None) -> bytes:
        """The object's bytes (or streamed into `sink(chunk)`), an interrupted stream an outage."""
        from botocore.exceptions import BotoCoreError

        body = response["Body"]
        try:
            if sink is None:
                return body.read()
            for chunk in body.iter_chunks(1 << 20):
                sink(chunk)
            return b""
        except (BotoCoreError, OSError) as exc:
            raise self._unavailable(f"reading from {self.location} failed: {exc}") from exc
        finally:
            body.close()

    def _unavailable(self, message: str) -> RegistryUnavailable:
        if self.last_error is None:
            log.warning("%s registry unreachable (serving what is loaded; retrying): %s", self.kind, message)
        self.last_error = message
        return RegistryUnavailable(message, param="registry")

    def _reachable(self) -> None:
        if self.last_error is not None:
            log.info("%s registry %s is reachable again", self.kind, self.location)
        self.last_error = None

    def _list(self, prefix: str, delimiter: str | None = None) -> tuple[list[str], list[str]]:
        """(keys, common prefixes) under `prefix`, every page."""
        keys, prefixes, token = [], [], None
        while True:
            kw: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kw)
            keys += [o["Key"] for o in page.get("Contents", [])]
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return keys, prefixes
            token = page["NextContinuationToken"]

    def _base(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        base = self._base()
        keys, _ = self._list(base)
        names = set()
        for key in keys:
            parts = key[len(base):].split("/")
            if len(parts) == 3 and parts[2] == MANIFEST and NAME_RE.fullmatch(parts[0]) and ".." not in parts[0] \
                    and VERSION_RE.fullmatch(parts[1]):
                names.add(parts[0])
        return sorted(names)

    def _numbers(self, name: str) -> tuple[list[int], list[int]]:
        """(published versions, every number ever claimed) of `name`."""
        base = self._key(name) + "/"
        keys, _ = self._list(base)
        published, claimed = set(), set()
        for key in keys:
            parts = key[len(base):].split("/")
            if len(parts) == 2 and (m := VERSION_RE.fullmatch(parts[0])):
                claimed.add(int(m.group(1)))
                if parts[1] == MANIFEST:
                    published.add(int(m.group(1)))
        return sorted(published), sorted(claimed)

    def versions(self, name: str) -> list[int]:
        return self._numbers(name)[0]

    def read_current(self, name: str) -> str | None:
        """CURRENT's text: a HEAD each call (its ETag), a GET only when the ETag changed."""
        from botocore.exceptions import ClientError

        key = self._key(name, CURRENT)
        try:
            etag = self._call("head_object", Key=key)["ETag"]
            cached = self._current.get(name)
            if cached is not None and cached[0] == etag:
                return cached[1]
            response = self._call("get_object", Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                self._current.pop(name, None)
                return None
            raise RegistryError(f"cannot read {self.location}/{name}/{CURRENT}: {exc}", param=self.kind) from exc
        text = self._read_body(response).decode("utf-8", errors="replace")
        self._current[name] = (response["ETag"], text)
        return text

    def exists(self, name: str, version: int) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("head_object", Key=self._key(name, vdir(version), MANIFEST))
            return True
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise RegistryError(f"cannot read {self.location}/{name}/{vdir(version)}: {exc}", param=self.kind) from exc

    def _lock(self, name: str, version: int) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault((name, version), threading.Lock())

    def _get_manifest(self, name: str, version: int) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            response = self._call("get_object", Key=self._key(name, vdir(version), MANIFEST))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise RegistryError(f"cannot read {name}@{version}'s manifest in {self.location}: {exc}",
                                param=self.kind) from exc
        return self._read_body(response)

    def version_dir(self, name: str, version: int) -> Path:
        """The verified cached copy of `name@version`, downloaded first if needed (every file
        checked against the manifest's sha256 before the folder is renamed into place). A version
        the store does not have gives a folder that does not exist."""
        final = self.root / name / vdir(version)
        self._used[(name, version)] = time.monotonic()
        if final.is_dir():
            return final
        with self._lock(name, version):
            if final.is_dir():  # another thread downloaded it while we waited
                return final
            data = self._get_manifest(name, version)
            if data is None:
                return final
            files = self._listed_files(name, version, data, final)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
            try:
                _write_durable(tmp / MANIFEST, data)
                for filename, digest in files.items():
                    self._download(name, version, filename, digest, tmp / filename, final)
                os.chmod(tmp, 0o755)
                _fsync_dir(tmp)
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not final.is_dir():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)  # another process's verified copy won
                _fsync_dir(final.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("cached %s %s@%d from %s", self.kind, name, version, self.location)
        return final

    def _listed_files(self, name: str, version: int, data: bytes, final: Path) -> dict[str, str]:
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise CheckpointError(f"{name}@{version}: its manifest is not JSON: {exc}", reason="bad_manifest",
                                  path=final) from exc
        files = raw.get("files") if isinstance(raw, dict) else None
        if not isinstance(files, dict):
            raise CheckpointError(f"{name}@{version}: its manifest lists no files", reason="bad_manifest", path=final)
        for filename, digest in files.items():
            if not safe_file_name(filename) or filename == MANIFEST:
                raise CheckpointError(f"{name}@{version}: refusing file {filename!r} (plain names inside the "
                                      f"version only)", reason="bad_file", path=final)
            if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
                raise CheckpointError(f"{name}@{version}: {filename}'s sha256 in the manifest is malformed",
                                      reason="bad_manifest", path=final)
        return files

    def _download(self, name: str, version: int, filename: str, digest: str, dest: Path, final: Path) -> None:
        from botocore.exceptions import ClientError

        key = self._key(name, vdir(version), filename)
        try:
            response = self._call("get_object", Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                raise CheckpointError(f"{name}@{version}: {filename} is missing from the store", reason="missing_file",
                                      path=final) from exc
            raise RegistryError(f"cannot read {name}@{version}'s {filename}: {exc}", param=self.kind) from exc
        h = hashlib.sha256()
        with open(dest, "wb") as out:
            def sink(chunk: bytes) -> None:
                h.update(chunk)
                out.write(chunk)

            self._read_body(response, sink)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(dest, 0o644)
        if h.hexdigest() != digest:
            log.error("refusing %s %s@%d: s3://%s/%s has sha256 %s, the manifest says %s", self.kind, name, version,
                      self.bucket, key, h.hexdigest(), digest)
            raise CheckpointError(f"{name}@{version}: {filename} does not match its sha256 (corrupted or truncated "
                                  f"in the store)", reason="hash_mismatch", path=final)

    def manifest_dir(self, name: str, version: int) -> Path:
        """The cached version's folder, or a folder with only its manifest (not the weights)."""
        final = self.root / name / vdir(version)
        if final.is_dir():
            return final
        folder = self.root / MANIFESTS / name / vdir(version)
        if (folder / MANIFEST).is_file():
            return folder
        data = self._get_manifest(name, version)
        if data is not None:  # versions are immutable: a manifest read once stays true
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, folder / MANIFEST)
        return folder

    # ------------------------------------------------------------------ writing
    def publish(self, name: str, write: Callable[[Path], dict[str, str]],
                finalise: Callable[[int, dict[str, str]], dict]) -> int:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root / name))
        try:
            files = write(tmp)
            version = self._claim(name)
            manifest = json.dumps(finalise(version, files), indent=2).encode()
            for path in sorted(tmp.iterdir()):
                if path.is_file() and path.name != MANIFEST:
                    with open(path, "rb") as f:
                        self._call("put_object", Key=self._key(name, vdir(version), path.name), Body=f)
            self._call("put_object", Key=self._key(name, vdir(version), MANIFEST), Body=manifest, IfNoneMatch="*")
            # published: readers see it from here on; this process keeps its files as a cached copy
            _write_durable(tmp / MANIFEST, manifest)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, self.root / name / vdir(version))
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("published %s %s@%d to %s", self.kind, name, version, self.location)
        return version

    def _claim(self, name: str) -> int:
        """The next free version number, taken with a conditional create (a racer takes the next)."""
        from botocore.exceptions import ClientError

        version = max(self._numbers(name)[1], default=0) + 1
        for _ in range(10_000):
            try:
                self._call("put_object", Key=self._key(name, vdir(version), CLAIM), Body=b"", IfNoneMatch="*")
                return version
            except ClientError as exc:
                if not _lost_race(exc):
                    raise RegistryError(f"cannot claim {name}@{version} in {self.location}: {exc}",
                                        param=self.kind) from exc
                version += 1
        raise RegistryError(f"no free version number for {name!r} in {self.location}", param=self.kind)

    def write_current(self, name: str, version: int, *, only_forward: bool = False) -> bool:
        """Compare-and-swap CURRENT: read it with its ETag, write with `If-Match` (`If-None-Match: *`
        when there is none), and on a lost race read again."""
        from botocore.exceptions import ClientError

        key, body = self._key(name, CURRENT), f"{vdir(version)}\n".encode()
        for _ in range(1000):
            try:
                response = self._call("get_object", Key=key)
                etag = response["ETag"]
                current = parse_current(self._read_body(response).decode("utf-8", errors="replace"))
            except ClientError as exc:
                if not _is_missing(exc):
                    raise RegistryError(f"cannot read {self.location}/{name}/{CURRENT}: {exc}", param=self.kind) from exc
                etag, current = None, None
            if current == version:
                return True
            if only_forward and current is not None and current > version:
                log.info("%s %s: CURRENT stays v%d (newer than the v%d just published)", self.kind, name, current,
                         version)
                return False
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self._call("put_object", Key=key, Body=body, **condition)
                self._current.pop(name, None)
                return True
            except ClientError as exc:
                if not (_lost_race(exc) or _is_missing(exc)):  # 404: deleted between our read and write
                    raise RegistryError(f"cannot write {self.location}/{name}/{CURRENT}: {exc}",
                                        param=self.kind) from exc
        raise RegistryError(f"{name}'s CURRENT kept changing under us; try again", param=self.kind)

    def delete_version(self, name: str, version: int) -> None:
        """Remove the manifest first (readers stop seeing the version), then its files; the claim
        stays so the number is never reused."""
        prefix = self._key(name, vdir(version)) + "/"
        keys, _ = self._list(prefix)
        manifest = prefix + MANIFEST
        if manifest in keys:
            self._call("delete_object", Key=manifest)
        rest = [{"Key": k} for k in keys if k not in (manifest, prefix + CLAIM)]
        for i in range(0, len(rest), 1000):
            self._call("delete_objects", Delete={"Objects": rest[i:i + 1000], "Quiet": True})
        for folder in (self.root / name / vdir(version), self.root / MANIFESTS / name / vdir(version)):
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ the cache
    def cached(self) -> list[tuple[str, int]]:
        """(name, version) of every verified copy in the cache."""
        found = []
        for name_dir in self.root.iterdir() if self.root.is_dir() else ():
            if NAME_RE.fullmatch(name_dir.name) and name_dir.is_dir():
                found += [(name_dir.name, int(m.group(1))) for p in name_dir.iterdir()
                          if (m := VERSION_RE.fullmatch(p.name)) and p.is_dir()]
        return sorted(found)

    def prune_cache(self, keep: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        keep = set(keep)
        now, dropped = time.monotonic(), []
        for name, version in self.cached():
            if (name, version) in keep or now - self._used.get((name, version), -1e18) < self.prune_grace_s:
                continue
            shutil.rmtree(self.root / name / vdir(version), ignore_errors=True)
            shutil.rmtree(self.root / MANIFESTS / name / vdir(version), ignore_errors=True)
            self._used.pop((name, version), None)
            dropped.append((name, version))
        if dropped:
            log.info("pruned %d cached version(s) of %s: %s", len(dropped), self.location,
                     ", ".join(f"{n}@{v}" for n, v in dropped))
        return dropped

    # ------------------------------------------------------------------ watching
    def fingerprint(self) -> tuple:
        """What a reader must follow, cheaply: the names (one LIST) and each CURRENT's ETag (one
        HEAD each); a name without CURRENT serves its newest version, so its versions count too."""
        from botocore.exceptions import ClientError

        base = self._base()
        _, prefixes = self._list(base, delimiter="/")
        entries = []
        for prefix in prefixes:
            name = prefix[len(base):].rstrip("/")
            if not NAME_RE.fullmatch(name) or ".." in name:
                continue
            try:
                entries.append((name, self._call("head_object", Key=self._key(name, CURRENT))["ETag"], ()))
            except ClientError as exc:
                if not _is_missing(exc):
                    raise RegistryError(f"cannot read {self.location}/{name}/{CURRENT}: {exc}") from exc
                entries.append((name, None, tuple(self.versions(name))))
        return tuple(entries)

    async def watch(self, reconcile: Reconcile, stop: asyncio.Event, what: str) -> None:
        """Reconcile now, then whenever the fingerprint changes (polled every `poll_interval` s) and
        once more when the store is reachable again after an outage; never raises on an outage."""
        last, was_ok, first = None, True, True
        while not stop.is_set():
            try:
                seen = await asyncio.to_thread(self.fingerprint)
            except RegistryError as exc:  # an outage is logged once by _unavailable; `last_error` says why
                seen = None
                if not isinstance(exc, RegistryUnavailable):
                    self.last_error = str(exc)
                    log.warning("%s poll failed: %s", what, exc)
            if first or seen is not None and (seen != last or not was_ok):
                await _reconcile_logged(reconcile, what)
            first, was_ok = False, seen is not None
            last = seen if seen is not None else last
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.poll_interval)
            except asyncio.TimeoutError:
                pass


__all__ = ["CLAIM", "DEFAULT_POLL_S", "S3Store", "make_client"]
