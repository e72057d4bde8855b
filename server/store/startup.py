"""Start-up of the database and what depends on it (files, batches and their runner, stored
completions), run by the app's lifespan. A database that cannot be opened is logged with the
reason; plain traffic is still served and the routes that need it answer 503 with that reason."""

from __future__ import annotations

import asyncio
import logging

import anyio

from server.store.db import Database, DatabaseUnavailable, default_url

log = logging.getLogger(__name__)


def open_store(app, settings):
    """Open the database and build the files, batches and stored-completions services on
    `app.state`; the batch runner (not started), or None when the database is unavailable."""
    from server.batches.files import FileStore
    from server.batches.runner import BatchRunner, replica_name
    from server.batches.serving import BatchServing
    from server.stored.serving import StoredCompletions

    data_dir = settings.resolved_data_dir()
    url = settings.database_url.get_secret_value() if settings.database_url else default_url(data_dir)
    app.state.store_error = None
    try:
        db = Database.open(url)
    except (DatabaseUnavailable, OSError) as exc:
        app.state.store_error = str(exc)
        log.error("%s; files, batches and stored completions answer 503 until it is repaired or replaced "
                  "(plain requests are served)", exc)
        return None
    log.info("database %s", db.safe_url())
    if settings.store_everything:
        log.warning("store_everything is on: every non-streamed chat completion is stored with its prompt "
                    "(a request with store: false opts out)")
    app.state.database = db
    app.state.files = FileStore(db, data_dir / "files", max_bytes=settings.max_file_bytes,
                                max_files=settings.max_files_per_key,
                                max_stored_bytes=settings.max_file_storage_bytes_per_key)
    runner = BatchRunner(db, app.state.files, lambda: app.state.serving, owner=replica_name(settings.port),
                         concurrency=settings.batch_concurrency, yield_max_wait=settings.batch_yield_max_s,
                         max_preemptions=settings.batch_max_preemptions, metrics=app.state.metrics)
    app.state.batches = BatchServing(db, wake=runner.wake, max_active=settings.max_active_batches_per_key)
    app.state.stored = StoredCompletions(db, metrics=app.state.metrics)
    return runner


async def start_store(app, settings) -> None:
    """`open_store` (in a worker thread), then the batch runner as a task, closed at shutdown."""
    runner = await anyio.to_thread.run_sync(open_store, app, settings)
    if runner is None:
        return
    task = asyncio.create_task(runner.run_forever())

    async def close():
        runner.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        app.state.database.close()

    app.state.closers.append(close)
