"""The release of iro-serve (pyproject.toml's `version`; `iro --version`, the server's /version and
the clients' User-Agent report it)."""

__version__ = "0.1.0"
