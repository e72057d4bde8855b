"""Start `iro serve` in a subprocess on a free port and wait until it is healthy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
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

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


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
    proc = subprocess.Popen([sys.executable, "-m", "iro.cli", "serve", *args], env=full_env, cwd=cwd,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    if not ready:
        return ServerProcess(url, proc, values_dir, log_path, 0.0)
    while time.monotonic() - t0 < wait:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_log_tail(log_path)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return ServerProcess(url, proc, values_dir, log_path, time.monotonic() - t0)
        except httpx.HTTPError:
            pass
        time.sleep(0.25)  # polling for readiness
    proc.kill()
    raise RuntimeError(f"server not healthy after {wait}s:\n{_log_tail(log_path)}")


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
