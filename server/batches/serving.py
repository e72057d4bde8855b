"""Batch jobs: create, read, list and cancel (`/v1/batches`). The `BatchRunner` runs them.

A batch belongs to the API key that created it (from one of that key's files): another key gets
404 for it and does not see it listed. A key may have `max_active` batches not yet ended; one
more is a 429 naming the quota."""

from __future__ import annotations

import time
import uuid

import sqlalchemy as sa

from server.batches.protocol import Batch, BatchCreateRequest, BatchErrors, BatchList, BatchRequestCounts, BatchUsage
from server.batches.files import UNFINISHED
from server.errors import ConflictError, InvalidRequestError, NotFoundError, QuotaExceededError
from server.store.db import Database, batch_results, batches, files, lock_api_key

WINDOW_SECONDS = {"24h": 24 * 3600}


def batch_object(row, counts: dict) -> Batch:
    done, failed, tokens_in, tokens_out = (counts.get(k, 0) for k in ("completed", "failed", "in", "out"))
    errors = BatchErrors(data=row.errors) if row.errors else None
    return Batch(id=row.id, endpoint=row.endpoint, errors=errors, input_file_id=row.input_file_id,
                 completion_window=row.completion_window, status=row.status, output_file_id=row.output_file_id,
                 error_file_id=row.error_file_id, created_at=row.created_at, in_progress_at=row.in_progress_at,
                 expires_at=row.expires_at, finalizing_at=row.finalizing_at, completed_at=row.completed_at,
                 failed_at=row.failed_at, expired_at=row.expired_at, cancelling_at=row.cancelling_at,
                 cancelled_at=row.cancelled_at, metadata=row.metadata,
                 request_counts=BatchRequestCounts(completed=done, failed=failed, total=row.total),
                 usage=BatchUsage(input_tokens=tokens_in, output_tokens=tokens_out, total_tokens=tokens_in + tokens_out))


def counts_of(conn: sa.Connection, batch_ids: list[str]) -> dict[str, dict]:
    """Per batch: answered lines (completed, failed) and tokens, from its recorded results."""
    if not batch_ids:
        return {}
    q = (sa.select(batch_results.c.batch_id, batch_results.c.ok, sa.func.count(),
                   sa.func.sum(batch_results.c.input_tokens), sa.func.sum(batch_results.c.output_tokens))
         .where(batch_results.c.batch_id.in_(batch_ids)).group_by(batch_results.c.batch_id, batch_results.c.ok))
    out: dict[str, dict] = {b: {} for b in batch_ids}
    for batch_id, ok, n, tin, tout in conn.execute(q):
        c = out[batch_id]
        c["completed" if ok else "failed"] = n
        c["in"] = c.get("in", 0) + (tin or 0)
        c["out"] = c.get("out", 0) + (tout or 0)
    return out


def _row(conn: sa.Connection, batch_id: str, api_key_name: str):
    """The batch's row; 404 when it is another API key's."""
    row = conn.execute(sa.select(batches).where(batches.c.id == batch_id,
                                                batches.c.api_key_name == api_key_name)).first()
    if row is None:
        raise NotFoundError(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    return row


class BatchServing:
    """Blocking methods, run by the routes in a worker thread; `wake` tells the runner there is work."""

    def __init__(self, db: Database, *, wake=lambda: None, max_active: int = 100):
        self.db = db
        self.wake = wake
        self.max_active = max_active

    def create_sync(self, request: BatchCreateRequest, *, api_key_name: str) -> Batch:
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex}"

        def create(conn):
            lock_api_key(conn, api_key_name)
            source = conn.execute(sa.select(files).where(files.c.id == request.input_file_id,
                                                         files.c.deleted.is_(False),
                                                         files.c.api_key_name == api_key_name)).first()
            if source is None:
                raise NotFoundError(f"No such File object: {request.input_file_id}", param="input_file_id",
                                    code="file_not_found")
            if source.purpose != "batch":
                raise InvalidRequestError(f"file {source.id} has purpose {source.purpose!r}; a batch's input file "
                                          "needs purpose \"batch\"", param="input_file_id", code="invalid_file")
            conn.execute(batches.insert().values(
                id=batch_id, endpoint=request.endpoint, input_file_id=source.id,
                completion_window=request.completion_window, status="validating", created_at=now,
                expires_at=now + WINDOW_SECONDS[request.completion_window], metadata=request.metadata,
                total=source.lines or 0, api_key_name=api_key_name))  # SQLite: this write takes the writer's lock
            active = conn.execute(sa.select(sa.func.count()).where(batches.c.api_key_name == api_key_name,
                                                                   batches.c.status.in_(UNFINISHED))).scalar()
            if active > self.max_active:  # counted with the new one, so two creates at once cannot both pass
                raise QuotaExceededError(f"API key {api_key_name!r} may have {self.max_active} batches not yet ended "
                                         f"(its quota, max_active_batches_per_key) and has {active - 1}: wait for one "
                                         "to end or cancel one", param=None, code="active_batches_quota_exceeded",
                                         quota="max_active_batches_per_key", limit=self.max_active)
            return _row(conn, batch_id, api_key_name)

        row = self.db.write_sync(create)
        self.wake()
        return batch_object(row, {})

    def get_sync(self, batch_id: str, *, api_key_name: str) -> Batch:
        def get(conn):
            row = _row(conn, batch_id, api_key_name)
            return row, counts_of(conn, [row.id])[row.id]

        return batch_object(*self.db.read_sync(get))

    def list_sync(self, *, after: str | None, limit: int, api_key_name: str) -> BatchList:
        def query(conn):
            q = sa.select(batches).where(batches.c.api_key_name == api_key_name)
            if after:
                seq = conn.execute(sa.select(batches.c.seq).where(batches.c.id == after,
                                                                  batches.c.api_key_name == api_key_name)).scalar()
                if seq is None:
                    raise NotFoundError(f"No such Batch object: {after}", param="after", code="batch_not_found")
                q = q.where(batches.c.seq < seq)
            rows = conn.execute(q.order_by(batches.c.seq.desc()).limit(limit + 1)).all()  # newest first, as OpenAI
            return rows, counts_of(conn, [r.id for r in rows[:limit]])

        rows, counts = self.db.read_sync(query)
        data = [batch_object(r, counts[r.id]) for r in rows[:limit]]
        return BatchList(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                         last_id=data[-1].id if data else None)

    def cancel_sync(self, batch_id: str, *, api_key_name: str) -> Batch:
        now = int(time.time())

        def cancel(conn):
            row = _row(conn, batch_id, api_key_name)
            if row.status in ("cancelling", "cancelled"):
                return row
            if row.status not in ("validating", "in_progress"):
                raise ConflictError(f"Cannot cancel a batch with status {row.status!r}", param="batch_id",
                                    code="batch_not_cancellable")
            conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.status == row.status)
                         .values(status="cancelling", cancelling_at=now))
            return _row(conn, batch_id, api_key_name)

        row = self.db.write_sync(cancel)
        self.wake()
        return self.get_sync(row.id, api_key_name=api_key_name)
