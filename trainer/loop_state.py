"""What every stage of a loop run shares: the run's state on disk (`RunState`, `run_dir/state.json`),
where the server is (`ServerLink`) and the loop's error (`LoopError`).

Every stage is recorded in `state.json` when it finishes, with its results; a re-run skips finished
stages. A run resumes only with the settings it was started with (`RESUMABLE_OPTIONS` aside).

    state = RunState.open(Path("runs/demo"), LoopConfig.from_preset("smoke"))
    state.finish("it1/rollout", {"seconds": 12.0}); state.stage("it1/rollout")
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.loop_config import DISTILL_OPTIONS, RESUMABLE_OPTIONS, LoopConfig
from trainer.rollout_records import write_atomic

STATE_FORMAT = 1


class LoopError(RuntimeError):
    """A stage that cannot go on (with what to do about it in the message)."""

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(f"{stage}: {message}" if stage else message)
        self.stage = stage


@dataclass(frozen=True)
class ServerLink:
    """The server a loop runs against: its root URL, API key (/v1) and admin key (registries)."""

    url: str
    api_key: str | None = None
    admin_key: str | None = None
    transport: Any = field(default=None, repr=False, compare=False)
    """httpx transport of the clients (tests pass an `httpx.MockTransport`); None: the network."""

    def client(self):
        """An `IroClient` with both keys (close it: `with link.client() as client`)."""
        from clients import IroClient

        return IroClient(self.url, api_key=self.api_key, admin_key=self.admin_key, transport=self.transport)


class RunState:
    """`state.json` of a run directory: the config, and each finished stage with its results."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def open(cls, run_dir: Path, config: LoopConfig) -> RunState:
        path = run_dir / "state.json"
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("format") != STATE_FORMAT:
                raise LoopError(f"{path}: unknown state format {data.get('format')!r}")
            old = LoopConfig.comparable(data.get("config", {}))
            resumable = RESUMABLE_OPTIONS
            if not any(key.startswith("distill/") for key in data.get("stages", {})):
                resumable = resumable | DISTILL_OPTIONS
            changed = {k: (old.get(k), v) for k, v in config.to_dict().items() if k not in resumable and old.get(k) != v}
            if changed:
                raise LoopError(f"{run_dir} was started with other settings {changed} (old, new); resume it with the "
                                "same preset and options, or use a new --run-dir")
            data["config"] = config.to_dict()
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            data = {"format": STATE_FORMAT, "run_id": uuid.uuid4().hex, "created_at": time.time(),
                    "config": config.to_dict(), "stages": {}, "versions": {}}
        state = cls(path, data)
        state.save()
        return state

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    def stage(self, key: str) -> dict[str, Any] | None:
        return self.data["stages"].get(key)

    def finish(self, key: str, info: dict[str, Any]) -> None:
        self.data["stages"][key] = info
        self.save()

    @property
    def adopted(self) -> list[int]:
        """Versions of the served chain a run continues (`iro loop --continue`) as its iterations
        1..N; [] for a run that started its own chain."""
        return list(self.data.get("adopted", []))

    def last_iteration(self, iterations: int) -> int:
        """The run's last iteration: its own `iterations` after the adopted chain's."""
        return len(self.adopted) + iterations

    def version(self, t: int) -> int | None:
        return self.data["versions"].get(str(t))

    def set_version(self, t: int, version: int) -> None:
        self.data["versions"][str(t)] = version
        self.save()

    def stage_seconds(self) -> float:
        """Wall time of every finished stage, summed."""
        return sum(info.get("seconds", 0.0) for info in self.data["stages"].values())

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2))


__all__ = ["LoopError", "RunState", "STATE_FORMAT", "ServerLink"]
