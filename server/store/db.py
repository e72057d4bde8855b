"""Engine, tables and the one writer of the server's database (SQLAlchemy Core).

    database_url unset   sqlite:///$IRO_HOME/data/iro.db   (one server)
    postgresql+psycopg://...                                 (several replicas share it)

SQLite runs in WAL mode with `synchronous=FULL`: a commit is fsynced before it returns, so an
answered batch line or a stored completion survives `kill -9` and a power cut (NORMAL+WAL would
survive `kill -9` but may lose the last commits on power loss; a commit per generated answer is
cheap next to the generation). Writes go through one thread (`Database.write`) or, from the routes'
worker threads, take the same process-wide lock (`write_sync`), so SQLite never sees two writers
from this process; readers run beside it (WAL). Tables are created if missing
(`metadata.create_all`, safe with several processes opening at once), and so are columns and
indexes added since a database was made (`ALTER TABLE ... ADD COLUMN` with the column's default):
the schema only grows.

Files, batches and stored completions belong to the API key that made them (`api_key_name`;
rows from before keys had names belong to `default`, the `api_key`'s, which made them).

A file that is not a database (or fails `PRAGMA quick_check`) raises `DatabaseUnavailable` with
the reason; the server logs it, keeps serving plain traffic and answers 503 on the routes that
need the database.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy import event

from server.settings import DEFAULT_KEY_NAME

log = logging.getLogger(__name__)
T = TypeVar("T")

_ESCAPED = re.compile(r"\\(\\|0)")


class UserText(sa.types.TypeDecorator):
    """Text a user sent (a filename, a custom_id, a model name, a metadata pair, a prompt).

    PostgreSQL's text cannot hold U+0000, which JSON and SQLite allow; there every value is stored
    escaped (`\\` -> `\\\\`, U+0000 -> `\\0`; reversible, and equality filters still match since the
    parameters compared with the column are escaped the same way) and as unbounded `text` (the API
    bounds the lengths; an escaped value may be longer). SQLite stores the value as is."""

    impl = sa.String
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.Text())
        return dialect.type_descriptor(sa.String(self.impl.length))

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name != "postgresql":
            return value
        return value.replace("\\", "\\\\").replace("\x00", "\\0")

    def process_result_value(self, value, dialect):
        if value is None or dialect.name != "postgresql":
            return value
        return _ESCAPED.sub(lambda m: "\\" if m[1] == "\\" else "\x00", value)


class ServerId(sa.types.TypeDecorator):
    """An id this server made (`file-<hex>`, `batch_<hex>`, `chatcmpl-<hex>`, ...). A value it cannot
    have made (other characters, longer) is compared as "", which no row has: a lookup of it finds
    nothing (404) on every database, where PostgreSQL would refuse U+0000 in it outright (500)."""

    impl = sa.String(64)
    cache_ok = True
    _MADE_HERE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

    def process_bind_param(self, value, dialect):
        if value is None or self._MADE_HERE.fullmatch(value):
            return value
        return ""


metadata = sa.MetaData()

files = sa.Table(
    "files", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", ServerId, unique=True, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("filename", UserText(512), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("lines", sa.Integer, nullable=True),  # batch input: request lines
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
    sa.Column("api_key_name", sa.String(64), nullable=False, server_default=DEFAULT_KEY_NAME),
    sa.Index("ix_files_api_key_name", "api_key_name"),
)

batches = sa.Table(
    "batches", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # stable order for listing
    sa.Column("id", ServerId, unique=True, nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", ServerId, nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("in_progress_at", sa.BigInteger, nullable=True),
    sa.Column("finalizing_at", sa.BigInteger, nullable=True),
    sa.Column("completed_at", sa.BigInteger, nullable=True),
    sa.Column("failed_at", sa.BigInteger, nullable=True),
    sa.Column("expired_at", sa.BigInteger, nullable=True),
    sa.Column("cancelling_at", sa.BigInteger, nullable=True),
    sa.Column("cancelled_at", sa.BigInteger, nullable=True),
    sa.Column("output_file_id", sa.String(64), nullable=True),
    sa.Column("error_file_id", sa.String(64), nullable=True),
    sa.Column("errors", sa.JSON, nullable=True),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("owner", sa.String(256), nullable=True),  # replica running it
    sa.Column("lease_until", sa.Float, nullable=True),  # its claim lapses after this time
    sa.Column("api_key_name", sa.String(64), nullable=False, server_default=DEFAULT_KEY_NAME),
    sa.Index("ix_batches_api_key_name", "api_key_name"),
)

batch_results = sa.Table(
    "batch_results", metadata,
    sa.Column("batch_id", ServerId, sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("custom_id", UserText(512), primary_key=True),  # the key: one answer per custom_id
    sa.Column("line", sa.Integer, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("result", sa.JSON, nullable=False),  # the output (or error) file's line
    sa.Column("input_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("output_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False, server_default="0"),  # of output_tokens: not returned
)

completions = sa.Table(
    "stored_completions", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # stable order for listing
    sa.Column("id", ServerId, unique=True, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("model", UserText(512), nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("request", sa.JSON, nullable=False),  # messages and settings, as sent
    sa.Column("response", sa.JSON, nullable=False),  # the chat.completion object
    sa.Column("prompt_text", UserText(), nullable=True),  # the chat template applied to the messages
    sa.Column("prompt_token_ids", sa.JSON, nullable=False),
    sa.Column("completion_token_ids", sa.JSON, nullable=False),  # one list per choice
    sa.Column("policy", sa.JSON, nullable=False),  # base, value chain + versions + betas, adapter
    sa.Column("api_key_name", sa.String(64), nullable=False, server_default=DEFAULT_KEY_NAME),
    sa.Index("ix_stored_completions_api_key_name", "api_key_name"),
)

completion_metadata = sa.Table(  # one row per pair: portable equality filters on SQLite and PostgreSQL
    "stored_completion_metadata", metadata,
    sa.Column("completion_id", ServerId, sa.ForeignKey("stored_completions.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("key", UserText(64), primary_key=True),
    sa.Column("value", UserText(512), nullable=False),
    sa.Index("ix_metadata_pair", "key", "value"),
)


def _add_missing_columns(conn: sa.Connection) -> None:
    """Columns (each with a default) and indexes added to a table since the database was made."""
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
                log.info("database: added column %s.%s", table.name, column.name)
        for index in table.indexes:
            index.create(conn, checkfirst=True)


def lock_api_key(conn: sa.Connection, name: str) -> None:
    """Serialize the quota checks of one API key's writes until this transaction ends. On
    PostgreSQL an advisory lock (replicas and read-committed transactions would otherwise both
    pass a check); SQLite has one writer at a time, taken by the write that precedes the check."""
    if conn.dialect.name == "postgresql":
        key = zlib.crc32(name.encode())
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:space, :key)"),
                     {"space": 7215800, "key": key - 2**32 if key >= 2**31 else key})


class DatabaseUnavailable(Exception):
    """The database cannot be opened or is corrupt; the message says which and why."""


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'iro.db'}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")  # another process's writer: wait, don't fail
    cursor.close()


class Database:
    """The engine plus one writer thread. `read`/`write` run a function `(connection) -> T` in a
    worker thread inside a transaction (committed on return, rolled back on an exception)."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs = {"connect_args": {"check_same_thread": False, "timeout": 10}} if self.is_sqlite else {
            "pool_pre_ping": True}
        self.engine = sa.create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._writer = anyio.CapacityLimiter(1)
        self._readers = anyio.CapacityLimiter(4)
        # SQLite: one writer per process also for the blocking callers (routes' worker threads), which
        # would otherwise wait on SQLite's busy handler, in sleeps of up to a second
        self._write_lock = threading.Lock() if self.is_sqlite else contextlib.nullcontext()

    @classmethod
    def open(cls, url: str) -> "Database":
        """Open (creating the folder and the tables) and check the database; `DatabaseUnavailable`
        with the reason otherwise."""
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        db = cls(url)
        try:
            with db.engine.begin() as conn:
                if db.is_sqlite:
                    verdict = conn.exec_driver_sql("PRAGMA quick_check").scalar()
                    if verdict != "ok":
                        raise DatabaseUnavailable(f"database {db.safe_url()} failed its integrity check: {verdict}")
            db._create_tables()
        except sa.exc.SQLAlchemyError as exc:
            db.engine.dispose()
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise DatabaseUnavailable(f"cannot open the database {db.safe_url()}: {reason}") from exc
        except DatabaseUnavailable:
            db.engine.dispose()
            raise
        return db

    def _create_tables(self) -> None:
        """The missing tables, columns and indexes, also when other processes (replicas, `iro data`)
        create them at the same moment: PostgreSQL serializes them on an advisory lock; SQLite's
        check-then-create is not atomic, so one another process created in between ("already
        exists", "duplicate column") is a retry, as is "database is locked": in WAL mode a transaction
        that read the schema cannot start writing after another process committed, and SQLite
        answers at once instead of waiting (its busy handler does not apply)."""
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    if not self.is_sqlite:
                        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7215800131)")
                    metadata.create_all(conn)
                    _add_missing_columns(conn)
                return
            except sa.exc.OperationalError as exc:
                lost_race = any(m in str(exc.orig) for m in ("already exists", "duplicate column",
                                                              "database is locked"))
                if not self.is_sqlite or not lost_race or attempt == 4:
                    raise

    def safe_url(self) -> str:
        """The URL without its password."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def write_sync(self, fn: Callable[[sa.Connection], T]) -> T:
        with self._write_lock, self.engine.begin() as conn:
            return fn(conn)

    def read_sync(self, fn: Callable[[sa.Connection], T]) -> T:
        with self.engine.connect() as conn:
            return fn(conn)

    async def write(self, fn: Callable[[sa.Connection], T]) -> T:
        return await anyio.to_thread.run_sync(self.write_sync, fn, limiter=self._writer)

    async def read(self, fn: Callable[[sa.Connection], T]) -> T:
        return await anyio.to_thread.run_sync(self.read_sync, fn, limiter=self._readers)

    def close(self) -> None:
        self.engine.dispose()
