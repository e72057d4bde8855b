"""`/v1/files`: uploaded batch input files and the batches' output files.

Contents live on disk (`<data dir>/files/<file id>`, written to a temporary name, fsynced, then
renamed: a reader never sees half a file); their metadata in the database. A batch input file is
checked line by line at upload: each line a JSON object with `custom_id` (unique in the file),
`method` POST, `url` one of the batch endpoints and an object `body` with a `model`; the first bad
line is refused with a 400 naming it. What a body asks for is checked when the line runs (the
error file holds the reason), as OpenAI does.

A file belongs to the API key that uploaded it (a batch's output and error files to the batch's):
another key gets 404 for it and does not see it listed. A key's quotas (files kept, bytes kept)
are checked at upload, in the transaction that records the file; outputs are always written and
count against the key's next upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import sqlalchemy as sa
from pydantic import ValidationError

from server.batches.protocol import MAX_BATCH_LINES, BatchInputLine, FileDeleted, FileList, FileObject
from server.errors import ConflictError, InvalidRequestError, NotFoundError, PayloadTooLargeError, QuotaExceededError
from server.store.db import Database, batches, files, lock_api_key

_CHUNK = 1 << 20
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
PURPOSES = ("batch", "batch_output")


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def _object(row) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose)


def parse_batch_lines(path: Path) -> list[BatchInputLine]:
    """The request lines of a batch input file; `InvalidRequestError` naming the first bad line."""
    lines: list[BatchInputLine] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"line {number}"
            try:
                item = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidRequestError(f"{where} is not valid JSON ({exc}); a batch file holds one JSON object "
                                          "per line (JSONL)", param="file", code="invalid_batch_file") from None
            try:
                line = BatchInputLine.model_validate(item)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "line"
                raise InvalidRequestError(f"{where}: {field}: {first['msg']} (each line needs custom_id, method "
                                          "\"POST\", url and body)", param="file", code="invalid_batch_file") from None
            if not isinstance(line.body.get("model"), str):
                raise InvalidRequestError(f"{where}: body.model is required (a string)", param="file",
                                          code="invalid_batch_file")
            if line.custom_id in seen:
                raise InvalidRequestError(f"{where}: custom_id {line.custom_id!r} appears twice; each must be unique",
                                          param="file", code="invalid_batch_file")
            seen.add(line.custom_id)
            lines.append(line)
            if len(lines) > MAX_BATCH_LINES:
                raise InvalidRequestError(f"a batch file holds at most {MAX_BATCH_LINES} requests", param="file",
                                          code="invalid_batch_file")
    if not lines:
        raise InvalidRequestError("the batch file holds no request lines", param="file", code="invalid_batch_file")
    return lines


class FileStore:
    """Files: contents under `root`, metadata in `db`. Blocking methods end in `_sync`; serving
    calls them in a worker thread. `max_bytes` bounds one file; `max_files` and `max_stored_bytes`
    what one API key keeps."""

    def __init__(self, db: Database, root: Path, *, max_bytes: int, max_files: int = 10_000,
                 max_stored_bytes: int = 10_000_000_000):
        self.db, self.root, self.max_bytes = db, root, max_bytes
        self.max_files, self.max_stored_bytes = max_files, max_stored_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    # ------------------------------------------------------------------ writes
    def _publish(self, file_id: str, chunks) -> tuple[int, str]:
        """Write `chunks` to `file_id` atomically; (size, sha256). 413 past `max_bytes`."""
        tmp = self.root / f".{file_id}.{uuid.uuid4().hex}.tmp"
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLargeError(f"file larger than this server's limit of {self.max_bytes} bytes",
                                                   param="file", code="file_too_large")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path(file_id))
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            tmp.unlink(missing_ok=True)
        return size, digest.hexdigest()

    def _check_quota(self, conn, api_key_name: str, *, uploading: bool) -> None:
        """`QuotaExceededError` naming the quota and its limit when the key's files pass one: before
        an upload (`uploading`), when they leave no room for one more; once its row is written, when
        they pass a quota with it."""
        count, size = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(files.c.bytes), 0)).where(
            files.c.api_key_name == api_key_name, files.c.deleted.is_(False))).one()
        keeps = "keeps" if uploading else "would keep"
        advice = "delete files (batch outputs count too) to upload more"
        if count + uploading > self.max_files:
            raise QuotaExceededError(f"API key {api_key_name!r} {keeps} {count} files; its quota "
                                     f"(max_files_per_key) is {self.max_files}: {advice}", param="file",
                                     code="files_quota_exceeded", quota="max_files_per_key", limit=self.max_files)
        if size + uploading > self.max_stored_bytes:
            raise QuotaExceededError(f"API key {api_key_name!r} {keeps} {size} bytes of files; its quota "
                                     f"(max_file_storage_bytes_per_key) is {self.max_stored_bytes}: {advice}",
                                     param="file", code="file_storage_quota_exceeded",
                                     quota="max_file_storage_bytes_per_key", limit=self.max_stored_bytes)

    def upload_sync(self, source: BinaryIO, filename: str, purpose: str, *, api_key_name: str) -> FileObject:
        if purpose != "batch":
            raise InvalidRequestError(f"purpose {purpose!r} is not supported here; upload batch input files with "
                                      "purpose \"batch\"", param="purpose", code="invalid_value")
        self.db.read_sync(lambda c: self._check_quota(c, api_key_name, uploading=True))  # full: refused before reading
        file_id = new_file_id()
        size, sha = self._publish(file_id, iter(lambda: source.read(_CHUNK), b""))
        try:
            lines = parse_batch_lines(self.path(file_id))
        except Exception:
            self.path(file_id).unlink(missing_ok=True)
            raise
        row = dict(id=file_id, bytes=size, created_at=int(time.time()), filename=filename[:512] or "upload.jsonl",
                   purpose=purpose, lines=len(lines), sha256=sha, deleted=False, api_key_name=api_key_name)

        def record(conn):  # written, then checked with it: two uploads at once cannot both pass
            lock_api_key(conn, api_key_name)
            conn.execute(files.insert().values(**row))  # SQLite: this write takes the one writer's lock
            self._check_quota(conn, api_key_name, uploading=False)

        try:
            self.db.write_sync(record)
        except Exception:
            self.path(file_id).unlink(missing_ok=True)
            raise
        return FileObject(id=file_id, bytes=size, created_at=row["created_at"], filename=row["filename"],
                          purpose="batch")

    def write_output_sync(self, conn: sa.Connection, file_id: str, filename: str, lines: list[dict], *,
                          api_key_name: str) -> None:
        """A batch's output or error file (JSONL), published then recorded in `conn`'s transaction;
        writing the same `file_id` again (a finalize resumed after a crash) replaces it."""
        size, sha = self._publish(file_id, ((json.dumps(line, ensure_ascii=False) + "\n").encode() for line in lines))
        conn.execute(files.delete().where(files.c.id == file_id))
        conn.execute(files.insert().values(id=file_id, bytes=size, created_at=int(time.time()), filename=filename,
                                           purpose="batch_output", lines=len(lines), sha256=sha, deleted=False,
                                           api_key_name=api_key_name))

    def delete_sync(self, file_id: str, *, api_key_name: str) -> FileDeleted:
        def delete(conn):
            self._row(conn, file_id, api_key_name)
            using = conn.execute(sa.select(batches.c.id).where(batches.c.input_file_id == file_id,
                                                               batches.c.status.in_(UNFINISHED))).first()
            if using is not None:
                raise ConflictError(f"file {file_id} is the input of batch {using.id}, which has not finished; "
                                    "cancel it first", param="file_id", code="file_in_use")
            conn.execute(files.update().where(files.c.id == file_id).values(deleted=True))

        self.db.write_sync(delete)
        self.path(file_id).unlink(missing_ok=True)
        return FileDeleted(id=file_id)

    # ------------------------------------------------------------------ reads
    @staticmethod
    def _row(conn, file_id: str, api_key_name: str):
        """The file's row; 404 when it is deleted or another API key's."""
        row = conn.execute(sa.select(files).where(files.c.id == file_id, files.c.deleted.is_(False),
                                                  files.c.api_key_name == api_key_name)).first()
        if row is None:
            raise NotFoundError(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return row

    def get_sync(self, file_id: str, *, api_key_name: str) -> FileObject:
        return _object(self.db.read_sync(lambda c: self._row(c, file_id, api_key_name)))

    def content_path_sync(self, file_id: str, *, api_key_name: str) -> Path:
        self.get_sync(file_id, api_key_name=api_key_name)
        path = self.path(file_id)
        if not path.exists():
            raise NotFoundError(f"the contents of {file_id} are missing from the server's file store",
                                param="file_id", code="file_not_found")
        return path

    def list_sync(self, *, after: str | None, limit: int, order: str, purpose: str | None,
                  api_key_name: str) -> FileList:
        if purpose and purpose not in PURPOSES:  # no file has it (nor U+0000, which PostgreSQL refuses)
            return FileList(data=[])

        def query(conn):
            q = sa.select(files).where(files.c.deleted.is_(False), files.c.api_key_name == api_key_name)
            if purpose:
                q = q.where(files.c.purpose == purpose)
            if after:
                seq = conn.execute(sa.select(files.c.seq).where(files.c.id == after,
                                                                files.c.api_key_name == api_key_name)).scalar()
                if seq is None:
                    raise NotFoundError(f"No such File object: {after}", param="after", code="file_not_found")
                q = q.where(files.c.seq < seq if order == "desc" else files.c.seq > seq)
            q = q.order_by(files.c.seq.desc() if order == "desc" else files.c.seq.asc()).limit(limit + 1)
            return conn.execute(q).all()

        rows = self.db.read_sync(query)
        data = [_object(r) for r in rows[:limit]]
        return FileList(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)
