"""The database layer on a real SQLite file and on a real PostgreSQL server (a throwaway one per
session, see tests/server/conftest.py): writers in two processes at once, a process killed between
write and commit, replicas creating the tables at once; on SQLite a corrupted file refused with the
reason."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa

from server.store.db import Database, DatabaseUnavailable, completions, default_url

ROW = dict(created=0, model="m", metadata={}, request={}, response={}, prompt_token_ids=[1],
           completion_token_ids=[[2]], policy={})

WRITER = textwrap.dedent("""
    import sys
    from server.store.db import Database, completions
    db = Database.open(sys.argv[1])
    row = dict(created=0, model="m", metadata={}, request={}, response={}, prompt_token_ids=[1],
               completion_token_ids=[[2]], policy={})
    for i in range(int(sys.argv[3])):
        db.write_sync(lambda c: c.execute(completions.insert().values(id=f"{sys.argv[2]}-{i}", **row)))
""")

HANGS_MID_TRANSACTION = textwrap.dedent("""
    import sys, time
    from server.store.db import Database, completions
    db = Database.open(sys.argv[1])
    row = dict(created=0, model="m", metadata={}, request={}, response={}, prompt_token_ids=[1],
               completion_token_ids=[[2]], policy={})
    with db.engine.begin() as conn:
        conn.execute(completions.insert().values(id="uncommitted", **row))
        print("written", flush=True)
        time.sleep(60)  # killed here, before the commit
""")


def count(db: Database) -> int:
    return db.read_sync(lambda c: c.execute(sa.select(sa.func.count()).select_from(completions)).scalar())


def test_the_defaults_are_wal_and_full_sync(tmp_path):
    db = Database.open(default_url(tmp_path))
    assert db.read_sync(lambda c: c.exec_driver_sql("PRAGMA journal_mode").scalar()) == "wal"
    assert db.read_sync(lambda c: c.exec_driver_sql("PRAGMA synchronous").scalar()) == 2  # FULL


def test_writers_in_two_processes_and_many_tasks_lose_nothing(database_url):
    url = database_url
    db = Database.open(url)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, name, "15"]) for name in ("p", "q")]

    async def many():
        await asyncio.gather(*(db.write(lambda c, i=i: c.execute(completions.insert().values(id=f"t-{i}", **ROW)))
                               for i in range(15)))

    asyncio.run(many())
    assert [p.wait(60) for p in procs] == [0, 0]
    assert count(db) == 45
    db.close()


def test_a_process_killed_between_write_and_commit_leaves_the_database_whole(database_url):
    url = database_url
    db = Database.open(url)
    db.write_sync(lambda c: c.execute(completions.insert().values(id="committed", **ROW)))
    proc = subprocess.Popen([sys.executable, "-c", HANGS_MID_TRANSACTION, url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.kill()
    proc.wait(10)
    proc.stdout.close()
    db.close()
    again = Database.open(url)  # passes quick_check on SQLite
    ids = again.read_sync(lambda c: c.execute(sa.select(completions.c.id)).scalars().all())
    assert ids == ["committed"]
    again.write_sync(lambda c: c.execute(completions.insert().values(id="after", **ROW)))  # no lock left behind
    assert count(again) == 2
    again.close()


OPENS = textwrap.dedent("""
    import sys
    from server.store.db import Database
    Database.open(sys.argv[1]).close()
    print("opened", flush=True)
""")


def test_replicas_creating_the_tables_at_once_all_start(database_url):
    procs = [subprocess.Popen([sys.executable, "-c", OPENS, database_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["opened"] * 2
    db = Database.open(database_url)
    db.write_sync(lambda c: c.execute(completions.insert().values(id="one", **ROW)))
    assert count(db) == 1
    db.close()


def test_an_unreachable_postgresql_is_refused_with_the_reason_and_no_password(postgres_server):
    folder, port = postgres_server
    with pytest.raises(DatabaseUnavailable) as info:
        Database.open(f"postgresql+psycopg://iro:s3cret@/no_such_database?host={folder}&port={port}")
    message = str(info.value)
    assert "no_such_database" in message and "does not exist" in message
    assert "s3cret" not in message and "***" in message


def test_a_file_that_is_not_a_database_is_refused_with_the_reason(tmp_path):
    (tmp_path / "iro.db").write_bytes(b"not a database at all " * 200)
    with pytest.raises(DatabaseUnavailable, match="file is not a database"):
        Database.open(default_url(tmp_path))


def test_damaged_pages_are_found_at_open(tmp_path):
    url = default_url(tmp_path)
    db = Database.open(url)
    db.write_sync(lambda c: c.execute(completions.insert(), [dict(id=f"r{i}", **{**ROW, "request": {"x": "y" * 500}})
                                                            for i in range(200)]))
    db.write_sync(lambda c: c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)"))
    db.close()
    path = tmp_path / "iro.db"
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(2 * page, len(data), 3 * page):  # scribble over every third page past the schema
        data[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(DatabaseUnavailable, match="integrity check|malformed|not a database"):
        Database.open(url)
