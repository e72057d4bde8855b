"""`/v1/files`: uploaded batch input files and the batches' output files.

Contents live on disk (`<data dir>/files/<file id>`, written to a temporary name, fsynced, then
renamed: a reader never sees half a file); their metadata in the database. A batch input file is
checked line by line at upload: each line a JSON object with `custom_id` (unique in the file),
`method` POST, `url` one of the batch endpoints and an object `body` with a `model`; the first bad
line is refused with a 400 naming it. What a body asks for is checked when the line runs (the
error file holds the reason), as OpenAI does.
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
from server.errors import ConflictError, InvalidRequestError, NotFoundError, PayloadTooLargeError
from server.store.db import Database, batches, files

_CHUNK = 1 << 20
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


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
    calls them in a worker thread."""

    def __init__(self, db: Database, root: Path, *, max_bytes: int):
        self.db, self.root, self.max_bytes = db, root, max_bytes
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

    def upload_sync(self, source: BinaryIO, filename: str, purpose: str) -> FileObject:
        if purpose != "batch":
            raise InvalidRequestError(f"purpose {purpose!r} is not supported here; upload batch input files with "
                                      "purpose \"batch\"", param="purpose", code="invalid_value")
        file_id = new_file_id()
        size, sha = self._publish(file_id, iter(lambda: source.read(_CHUNK), b""))
        try:
            lines = parse_batch_lines(self.path(file_id))
        except Exception:
            self.path(file_id).unlink(missing_ok=True)
            raise
        row = dict(id=file_id, bytes=size, created_at=int(time.time()), filename=filename[:512] or "upload.jsonl",
                   purpose=purpose, lines=len(lines), sha256=sha, deleted=False)
        try:
            self.db.write_sync(lambda c: c.execute(files.insert().values(**row)))
        except Exception:
            self.path(file_id).unlink(missing_ok=True)
            raise
        return FileObject(id=file_id, bytes=size, created_at=row["created_at"], filename=row["filename"],
                          purpose="batch")

    def write_output_sync(self, conn: sa.Connection, file_id: str, filename: str, lines: list[dict]) -> None:
        """A batch's output or error file (JSONL), published then recorded in `conn`'s transaction;
        writing the same `file_id` again (a finalize resumed after a crash) replaces it."""
        size, sha = self._publish(file_id, ((json.dumps(line, ensure_ascii=False) + "\n").encode() for line in lines))
        conn.execute(files.delete().where(files.c.id == file_id))
        conn.execute(files.insert().values(id=file_id, bytes=size, created_at=int(time.time()), filename=filename,
                                           purpose="batch_output", lines=len(lines), sha256=sha, deleted=False))

    def delete_sync(self, file_id: str) -> FileDeleted:
        def delete(conn):
            self._row(conn, file_id)
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
    def _row(conn, file_id: str):
        row = conn.execute(sa.select(files).where(files.c.id == file_id, files.c.deleted.is_(False))).first()
        if row is None:
            raise NotFoundError(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return row

    def get_sync(self, file_id: str) -> FileObject:
        return _object(self.db.read_sync(lambda c: self._row(c, file_id)))

    def content_path_sync(self, file_id: str) -> Path:
        self.get_sync(file_id)
        path = self.path(file_id)
        if not path.exists():
            raise NotFoundError(f"the contents of {file_id} are missing from the server's file store",
                                param="file_id", code="file_not_found")
        return path

    def list_sync(self, *, after: str | None, limit: int, order: str, purpose: str | None) -> FileList:
        def query(conn):
            q = sa.select(files).where(files.c.deleted.is_(False))
            if purpose:
                q = q.where(files.c.purpose == purpose)
            if after:
                seq = conn.execute(sa.select(files.c.seq).where(files.c.id == after)).scalar()
                if seq is None:
                    raise NotFoundError(f"No such File object: {after}", param="after", code="file_not_found")
                q = q.where(files.c.seq < seq if order == "desc" else files.c.seq > seq)
            q = q.order_by(files.c.seq.desc() if order == "desc" else files.c.seq.asc()).limit(limit + 1)
            return conn.execute(q).all()

        rows = self.db.read_sync(query)
        data = [_object(r) for r in rows[:limit]]
        return FileList(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)
