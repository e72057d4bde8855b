"""The batch runner: answers batch lines in-process, through the same serving objects as
`/v1/chat/completions` and `/v1/completions` (plain and guided models alike).

- One batch at a time per replica, claimed in the database with a lease (owner + lease_until), so
  several replicas sharing a PostgreSQL database never run the same batch at once; a restarted
  server (same host and port) takes its own batches back at once, another replica after the lease.
- At most `concurrency` lines in flight, and only one while interactive requests are in progress
  and for `interactive_cooldown` seconds after the last one was seen: batches run at a lower
  priority than interactive traffic. (Without the cool-down, the gaps between back-to-back
  interactive requests refilled the batch to `concurrency` lines, which the next interactive
  request then shared the engine's steps with.) A guided line's search also waits before each of
  its steps while interactive requests are recent, at most `yield_max_wait` seconds a step
  (`server.priority`), so the line left in flight does not share the engine's steps with them either.
  An engine request of a line that an interactive request interrupts is cancelled and runs again
  after the wait (at most `max_preemptions` times; `server.priority.preemptible`).
- Each answered line is committed with its `custom_id` as part of the primary key before the next
  is counted: after `kill -9` a new start resumes the batch and skips every line already answered,
  so each `custom_id` is answered exactly once.
- Finalizing writes the output file (lines answered 200) and the error file (the others), in
  input order, in OpenAI's line format. They belong to the batch's API key, as do the completions
  its lines store (`store: true`).
- A batch still running when its completion window ends (`expires_at`, on `clock`) stops at once
  and ends `expired`, as OpenAI's do: the lines answered are in the output file, the others in the
  error file with code `batch_expired`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import sqlalchemy as sa
from pydantic import ValidationError

from common.protocol import ChatCompletionRequest, CompletionRequest
from server.batches.files import FileStore, parse_batch_lines
from server.batches.protocol import BatchInputLine
from server.errors import IroError, validation_error_info
from server.priority import LOW_PRIORITY, InteractiveWatch
from server.store.db import Database, batch_results, batches

log = logging.getLogger(__name__)
LEASE_SECONDS = 60.0
POLL_SECONDS = 2.0
ACTIVE = ("validating", "in_progress", "cancelling", "finalizing")
_REQUESTS = {  # endpoint -> (request type, its serving call with the batch's API key name)
    "/v1/chat/completions": (ChatCompletionRequest,
                             lambda serving, request, key: serving.create_chat_completion(request, api_key_name=key)),
    "/v1/completions": (CompletionRequest, lambda serving, request, key: serving.create_completion(request)),
}


def replica_name(port: int) -> str:
    """This replica's name in batch leases: stable across restarts on the same host and port."""
    return f"{socket.gethostname()}:{port}"


def error_line(custom_id: str, status: int, error: dict) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": {"error": error}},
            "error": None}


def expired_line(custom_id: str) -> dict:
    """The error-file line of a request the batch's completion window ended before (OpenAI's)."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": "batch_expired",
                      "message": "This request could not be executed before the completion window expired."}}


def validation_error(exc: ValidationError) -> dict:
    """The 400 body the HTTP endpoint would answer for a body that does not validate."""
    return validation_error_info(exc.errors())


class BatchRunner:
    """Runs claimed batches until `stop()`; `serving()` returns the `OpenAIServing` (None while the
    engine starts). `clock` (Unix seconds) decides when a batch's window has ended."""

    def __init__(self, db: Database, files: FileStore, serving, *, owner: str, concurrency: int = 4, metrics=None,
                 clock: Callable[[], float] = time.time, interactive_cooldown: float = 1.0,
                 yield_max_wait: float = 2.0, max_preemptions: int = 8,
                 monotonic: Callable[[], float] = time.monotonic):
        self.db, self.files, self.serving = db, files, serving
        self.owner, self.concurrency, self.clock = owner, concurrency, clock
        self._wake = asyncio.Event()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lines = self.failures = self.yielded = self.preempted = None
        if metrics is not None:
            from prometheus_client import Counter

            self.lines = Counter("iro_batch_lines_total", "Batch lines answered, by outcome", ["outcome"],
                                 registry=metrics.registry)
            self.failures = Counter("iro_batch_runner_errors_total", "Batch runner failures (database, files)",
                                    registry=metrics.registry)
            self.yielded = Counter("iro_batch_yield_seconds_total", "Seconds batch lines' searches waited for "
                                   "interactive requests", registry=metrics.registry)
            self.preempted = Counter("iro_batch_preemptions_total", "Engine requests of batch lines cancelled "
                                     "for an arriving interactive request (each ran again)", registry=metrics.registry)
        self.watch = InteractiveWatch(self._interactive, cooldown=interactive_cooldown, max_wait=yield_max_wait,
                                      max_preemptions=max_preemptions, monotonic=monotonic,
                                      on_wait=self.yielded.inc if metrics is not None else None,
                                      on_preempt=self.preempted.inc if metrics is not None else None)

    def _interactive(self) -> bool:
        """Interactive requests are in progress (batch lines are not admitted through the router)."""
        return getattr(self.serving(), "_admitted", 0) > 0

    def wake(self) -> None:
        """Look for work now; callable from any thread or event loop (asyncio.Event is neither
        thread-safe nor shareable between loops, so the set goes through the runner's own loop)."""
        if self._loop is None or self._loop.is_closed():
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def stop(self) -> None:
        """Stop after the line in flight; callable like `wake`."""
        self._stopped = True
        self.wake()

    # ------------------------------------------------------------------ the loop
    async def run_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        while not self._stopped:
            try:
                if await self.run_once():
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch runner failed; retrying in %.0f s", POLL_SECONDS)
                if self.failures is not None:
                    self.failures.inc()
            self._wake.clear()
            if self._stopped:
                break
            try:  # a new batch wakes us; other replicas' batches (and lapsed leases) are polled
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def run_once(self) -> bool:
        """Claim one unfinished batch and run it until it ends (or this runner stops); False when
        there was none to claim."""
        row = await self.db.write(self._claim)
        if row is None:
            return False
        await self._run(row)
        return True

    def _claimable(self, now: float):
        return sa.and_(batches.c.status.in_(ACTIVE), sa.or_(batches.c.owner.is_(None), batches.c.owner == self.owner,
                                                            batches.c.lease_until < now))

    def _claim(self, conn: sa.Connection):
        now = time.time()
        row = conn.execute(sa.select(batches).where(self._claimable(now)).order_by(batches.c.seq).limit(1)).first()
        if row is None:
            return None
        taken = conn.execute(batches.update().where(batches.c.id == row.id, self._claimable(now))
                             .values(owner=self.owner, lease_until=now + LEASE_SECONDS)).rowcount
        return row if taken == 1 else None

    def _set(self, batch_id: str, **values) -> Any:
        return self.db.write(lambda c: c.execute(batches.update().where(batches.c.id == batch_id).values(**values)))

    async def _status(self, batch_id: str) -> str:
        """The batch's status; renews the lease."""
        def renew(conn):
            conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.owner == self.owner)
                         .values(lease_until=time.time() + LEASE_SECONDS))
            return conn.execute(sa.select(batches.c.status).where(batches.c.id == batch_id)).scalar()

        return await self.db.write(renew)

    async def _run(self, row) -> None:
        status = row.status
        if status == "validating":
            status = await self._validate(row)
        if status == "in_progress":
            status = "expired" if self._expired(row) else await self._answer_lines(row)
        if status in ("cancelling", "finalizing", "expired", "in_progress"):
            final = {"cancelling": "cancelled", "expired": "expired"}.get(status, "completed")
            await self._finalize(row.id, final)

    def _expired(self, row) -> bool:
        return row.expires_at is not None and self.clock() >= row.expires_at

    async def _validate(self, row) -> str:
        try:
            lines = await anyio.to_thread.run_sync(parse_batch_lines, self.files.path(row.input_file_id))
        except (IroError, OSError) as exc:
            message = getattr(exc, "message", None) or f"cannot read the input file: {exc}"
            errors = [{"code": "invalid_file", "line": None, "message": message, "param": "input_file_id"}]
            await self._set(row.id, status="failed", failed_at=int(time.time()), errors=errors, owner=None)
            return "failed"
        wrong = [{"code": "invalid_url", "line": i, "param": "url",
                  "message": f"line {i}: url {line.url!r} differs from the batch's endpoint {row.endpoint!r}"}
                 for i, line in enumerate(lines, start=1) if line.url != row.endpoint]
        if wrong:
            await self._set(row.id, status="failed", failed_at=int(time.time()), errors=wrong[:100], owner=None)
            return "failed"
        done = await self.db.write(lambda c: c.execute(
            batches.update().where(batches.c.id == row.id, batches.c.status == "validating")
            .values(status="in_progress", in_progress_at=int(time.time()), total=len(lines))).rowcount)
        return "in_progress" if done else await self._status(row.id)

    async def _answer_lines(self, row) -> str:
        lines = await anyio.to_thread.run_sync(parse_batch_lines, self.files.path(row.input_file_id))
        answered = set(await self.db.read(lambda c: c.execute(
            sa.select(batch_results.c.custom_id).where(batch_results.c.batch_id == row.id)).scalars().all()))
        todo = [(i, line) for i, line in enumerate(lines, start=1) if line.custom_id not in answered]
        if answered:
            log.info("batch %s: resuming, %d of %d lines already answered", row.id, len(answered), len(lines))
        in_flight: set[asyncio.Task] = set()
        status = "in_progress"
        last_check = time.monotonic()
        for number, line in todo:
            while len(in_flight) >= self._capacity() and not self._stopped:
                if in_flight:  # lower priority: wait for a slot (or for interactive requests to end)
                    await asyncio.wait(in_flight, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                else:  # the engine is starting
                    await asyncio.sleep(0.05)
                in_flight = {t for t in in_flight if not t.done()}
            if self._stopped:
                break
            if self._expired(row):
                status = "expired"
                break
            if time.monotonic() - last_check > 1.0 or self._wake.is_set():  # a cancel wakes us
                last_check = time.monotonic()
                self._wake.clear()
                status = await self._status(row.id)
                if status != "in_progress":
                    break
            in_flight.add(asyncio.create_task(self._answer(row, number, line)))
        if status != "in_progress" or self._stopped:
            for task in in_flight:  # cancelled, expired or shutting down: abort what runs (its engine requests too)
                task.cancel()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.error("batch %s: a line failed to record: %r", row.id, r)
        if self._stopped:
            return "stopped"
        if status == "expired":
            return status
        status = await self._status(row.id)
        return "finalizing" if status == "in_progress" else status

    def _capacity(self) -> int:
        """Lines the batch may have in flight now: 0 while the engine starts, 1 while interactive
        requests run and for `interactive_cooldown` seconds after, else `concurrency`."""
        if self.serving() is None:
            return 0
        return 1 if self.watch.recent() else self.concurrency

    async def _answer(self, row, number: int, line: BatchInputLine) -> None:
        batch_id = row.id
        result, ok, tokens = await self._call(line, row.api_key_name)
        if self.lines is not None:
            self.lines.labels("completed" if ok else "failed").inc()

        def record(conn):
            exists = conn.execute(sa.select(batch_results.c.line).where(
                batch_results.c.batch_id == batch_id, batch_results.c.custom_id == line.custom_id)).first()
            if exists is None:  # exactly once per custom_id (also the primary key)
                conn.execute(batch_results.insert().values(batch_id=batch_id, custom_id=line.custom_id, line=number,
                                                           ok=ok, result=result, input_tokens=tokens[0],
                                                           output_tokens=tokens[1], reasoning_tokens=tokens[2]))
            conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.owner == self.owner)
                         .values(lease_until=time.time() + LEASE_SECONDS))

        await self.db.write(record)

    async def _call(self, line: BatchInputLine, api_key_name: str) -> tuple[dict, bool, tuple[int, int, int]]:
        """(output line, answered 200, (prompt tokens, completion tokens, those of them not returned))."""
        request_type, call = _REQUESTS[line.url]
        try:
            request = request_type.model_validate(line.body)
        except ValidationError as exc:
            return error_line(line.custom_id, 400, validation_error(exc)), False, (0, 0, 0)
        if request.stream:
            return error_line(line.custom_id, 400, {"message": "stream is not supported in a batch",
                                                    "type": "invalid_request_error", "param": "stream",
                                                    "code": "invalid_value"}), False, (0, 0, 0)
        serving = self.serving()
        LOW_PRIORITY.set(self.watch)  # this line's task (and the tasks it starts): its searches yield
        try:
            serving.engine_check()
            response = await call(serving, request, api_key_name)
        except IroError as exc:
            error = exc.to_response().error.model_dump()
            return error_line(line.custom_id, exc.status_code, error), False, (0, 0, 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an engine failure: this line fails, the batch goes on
            log.exception("batch line %r failed", line.custom_id)
            return ({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": None,
                     "error": {"code": "server_error", "message": f"internal error ({type(exc).__name__})"}},
                    False, (0, 0, 0))
        body = response.model_dump(mode="json")
        usage = response.usage
        details = usage.completion_tokens_details if usage else None
        tokens = (usage.prompt_tokens, usage.completion_tokens, details.reasoning_tokens if details else 0) \
            if usage else (0, 0, 0)
        return ({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
                 "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
                 "error": None}, True, tokens)

    async def _finalize(self, batch_id: str, final: str) -> None:
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final]
        if final == "completed":
            await self.db.write(lambda c: c.execute(
                batches.update().where(batches.c.id == batch_id, batches.c.status == "in_progress")
                .values(status="finalizing", finalizing_at=int(time.time()))))
        unanswered: list[tuple[int, str]] = []
        if final == "expired":
            row = await self.db.read(lambda c: c.execute(sa.select(batches).where(batches.c.id == batch_id)).one())
            lines = await anyio.to_thread.run_sync(parse_batch_lines, self.files.path(row.input_file_id))
            unanswered = [(i, line.custom_id) for i, line in enumerate(lines, start=1)]

        def finish(conn):
            key_name = conn.execute(sa.select(batches.c.api_key_name).where(batches.c.id == batch_id)).scalar_one()
            if unanswered:  # the window ended: each line not answered fails with batch_expired
                answered = set(conn.execute(sa.select(batch_results.c.custom_id)
                                            .where(batch_results.c.batch_id == batch_id)).scalars())
                expired = [{"batch_id": batch_id, "custom_id": custom_id, "line": number, "ok": False,
                            "result": expired_line(custom_id), "input_tokens": 0, "output_tokens": 0,
                            "reasoning_tokens": 0}
                           for number, custom_id in unanswered if custom_id not in answered]
                if expired:
                    conn.execute(batch_results.insert(), expired)
            rows = conn.execute(sa.select(batch_results.c.ok, batch_results.c.result)
                                .where(batch_results.c.batch_id == batch_id).order_by(batch_results.c.line)).all()
            good = [r.result for r in rows if r.ok]
            bad = [r.result for r in rows if not r.ok]
            stem = batch_id.removeprefix("batch_")
            output_id = f"file-{stem}-output" if good else None
            error_id = f"file-{stem}-errors" if bad else None
            if good:
                self.files.write_output_sync(conn, output_id, f"{batch_id}_output.jsonl", good, api_key_name=key_name)
            if bad:
                self.files.write_output_sync(conn, error_id, f"{batch_id}_error.jsonl", bad, api_key_name=key_name)
            conn.execute(batches.update().where(batches.c.id == batch_id).values(
                status=final, output_file_id=output_id, error_file_id=error_id, owner=None,
                **{stamp: int(self.clock() if final == "expired" else time.time())}))
            return len(good), len(bad)

        good, bad = await self.db.write(finish)
        log.info("batch %s %s: %d answered, %d failed", batch_id, final, good, bad)
