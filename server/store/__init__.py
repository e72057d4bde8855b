"""The server's database: files' metadata, batch jobs and their per-line results, stored
completions (SQLAlchemy Core; SQLite under `$IRO_HOME` by default, PostgreSQL for replicas)."""
