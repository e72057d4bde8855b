"""Value admin endpoints: list, load, rollback and unload value functions in the running server."""
