"""Where iro keeps its files: `$IRO_HOME` and the folders under it, decided here and nowhere else.

    $IRO_HOME            default ~/.cache/iro
    ├── models/          prepared base models (common.model_store)
    ├── values/          the default value registry ($IRO_VALUES_DIR overrides it)
    └── policies/        reserved for policy checkpoints
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def iro_home() -> Path:
    """Cache folder for prepared models and the default value registry (`$IRO_HOME`)."""
    return Path(os.environ.get("IRO_HOME") or Path.home() / ".cache" / "iro").expanduser()


def default_values_dir() -> Path:
    """The value registry used when none is given: `$IRO_VALUES_DIR`, else `$IRO_HOME/values`."""
    if os.environ.get("IRO_VALUES_DIR"):
        return Path(os.environ["IRO_VALUES_DIR"]).expanduser()
    return iro_home() / "values"


def models_dir() -> Path:
    """Prepared base models: `$IRO_HOME/models`."""
    return iro_home() / "models"


def policies_dir() -> Path:
    """Policy checkpoints: `$IRO_HOME/policies` (created by whoever writes one first)."""
    return iro_home() / "policies"


@contextlib.contextmanager
def staged_dir(target: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder beside `target` to write into; when the block succeeds it replaces
    `target` (a rename on the same file system), when it fails it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
