"""Start `iro serve` in a subprocess on a free port and wait until it is healthy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    values_dir: Path
    log_path: Path
    started_in: float
    t0: float = field(default_factory=time.monotonic)
    """When the process was started (time.monotonic)."""
    health_seen: list = field(default_factory=list)
    """What /health answered while the server started, in order: "no connection", or
    (status, error code) pairs (code None on a 200)."""

    def wait_healthy(self, wait: float = 300) -> "ServerProcess":
        """Poll /health until 200 (recording the answers in `health_seen`); raise if the process
        exits or `wait` seconds pass."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{_log_tail(self.log_path)}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                code = None if r.status_code == 200 else (r.json().get("error") or {}).get("code")
                if not self.health_seen or self.health_seen[-1] != (r.status_code, code):
                    self.health_seen.append((r.status_code, code))
                if r.status_code == 200:
                    self.started_in = time.monotonic() - self.t0
                    return self
            except (httpx.HTTPError, ValueError):
                if not self.health_seen:
                    self.health_seen.append("no connection")
            time.sleep(0.25)  # polling for readiness
        self.stop_group()  # the engine core too: it would outlive its parent
        raise RuntimeError(f"server not healthy after {wait}s:\n{_log_tail(self.log_path)}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def stop_group(self) -> None:
        """`stop`, then SIGKILL whatever is left of the server's process group (its own session:
        vLLM's engine core and workers, should they outlive the API process)."""
        try:
            if self.proc.poll() is None:
                self.stop()
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]


def start(workdir: Path, *, env: dict | None = None, args: list[str] = (), wait: float = 300,
          cwd: Path | None = None, ready: bool = True) -> ServerProcess:
    """`iro serve` on a free port with `workdir/values` as its registry; returns once /health is 200
    (or right away with `ready=False`, to watch the start)."""
    port = free_port()
    values_dir = workdir / "values"
    values_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"server-{port}.log"
    full_env = {**os.environ, "IRO_VALUES_DIR": str(values_dir), "IRO_PORT": str(port), **(env or {})}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "iro.cli", "serve", *args], env=full_env, cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    srv = ServerProcess(f"http://127.0.0.1:{port}", proc, values_dir, log_path, 0.0, t0)
    return srv.wait_healthy(wait) if ready else srv


def peak_rss_mib(pid: int, *, children: bool = True) -> float:
    """Peak resident memory (VmHWM) of a process (+ its descendants), in MiB."""
    def hwm(p: int) -> float:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    total = hwm(pid)
    if children:
        for child in _descendants(pid):
            total += hwm(child)
    return total


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        kids = []
        try:
            for task in Path(f"/proc/{p}/task").iterdir():  # children of every thread
                kids += (task / "children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        stack += [int(k) for k in kids]
    return out


def process_tree_cpu(pid: int, *, process=None) -> dict[int, tuple[str, float]]:
    """User + system CPU seconds of `pid` and of each live descendant, by pid: (role, seconds). The
    root is "api" (uvicorn, the search, the scorer); the others are named as the OS names them
    (`VLLM::EngineCore`, `VLLM::Worker`, ...). Children's reaped time (`children_user`) is left out:
    a live child is counted by itself, once. `process` stands in for `psutil.Process` in tests."""
    if process is None:
        import psutil  # vLLM's dependency, so present wherever the server runs

        process = psutil.Process
    gone = _no_such_process()
    root = process(pid)
    out = {}
    for i, p in enumerate([root, *root.children(recursive=True)]):
        try:
            t = p.cpu_times()
            out[p.pid] = ("api" if i == 0 else p.name(), t.user + t.system)
        except gone:  # exited between the listing and the reading: nothing left to count
            continue
    return out


def _no_such_process() -> type[BaseException]:
    try:
        import psutil

        return psutil.Error
    except ImportError:  # pragma: no cover
        return OSError


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU core-seconds spent between two `process_tree_cpu` snapshots, summed by role, and "total".
    A process born in between counts from zero; one that ended in between is not counted (its time
    can no longer be read): "ended" says how many did.

    >>> cpu_spent({1: ("api", 1.0), 2: ("VLLM::EngineCore", 5.0), 3: ("x", 1.0)},
    ...           {1: ("api", 1.5), 2: ("VLLM::EngineCore", 7.0), 4: ("VLLM::Worker", 0.25)})
    {'api': 0.5, 'VLLM::EngineCore': 2.0, 'VLLM::Worker': 0.25, 'total': 2.75, 'ended': 1}
    """
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - (before[pid][1] if pid in before else 0.0)
    return {**spent, "total": sum(spent.values()), "ended": len(set(before) - set(after))}
