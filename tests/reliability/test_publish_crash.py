"""A trainer SIGKILLed in the middle of a publish, at every step of it, while the server watches.

Whatever the point of death, no partial version is ever visible as a version (leftover `.tmp-*`
folders and `.CURRENT-*` files are ignored), CURRENT keeps naming a complete version, the server
never tries (so never refuses) anything half-written, and the next publish succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT
from tests.e2e.test_guided import iro_values_init, wait_serving
from tests.reliability.publisher import POINTS
from valuefn.registry import Registry

pytestmark = pytest.mark.e2e
NAME = "crash"


def start_publisher(server, source, point: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.publisher", str(server.values_dir), NAME,
                             str(source), point], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The publisher's first stdout line, waited for with a deadline."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert line, f"publisher said nothing in {timeout}s: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
    return line[0].strip()


def test_trainer_killed_mid_publish_leaves_nothing_partial(server):
    registry = Registry(server.values_dir)
    good = iro_values_init(server, NAME)
    wait_serving(server, NAME, good)
    source = registry.path(NAME, good)

    # every publisher runs to its point (concurrently, like several crashed trainers), then dies
    procs = {point: start_publisher(server, source, point) for point in POINTS}
    try:
        for point, proc in procs.items():
            assert read_line(proc, 120) == f"BLOCKED {point}"
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            proc.stdout.close()
            proc.stderr.close()
    assert all(p.returncode == -signal.SIGKILL for p in procs.values())

    name_dir = server.values_dir / NAME
    leftovers = sorted(p.name for p in name_dir.iterdir() if p.name.startswith("."))
    assert sum(n.startswith(".tmp-") for n in leftovers) == 5, leftovers  # killed before the rename
    assert sum(n.startswith(".CURRENT-") for n in leftovers) == 1, leftovers  # killed before replacing CURRENT
    assert registry.current(NAME) == good
    # The two killed after their rename left complete versions (never made CURRENT); nothing else is a version.
    versions = registry.versions(NAME)
    assert versions == [good, good + 1, good + 2], versions
    for v in versions:
        registry.verify(NAME, v)  # manifest + every hash

    # the next publish succeeds, is picked up, and nothing half-written was ever tried by the server
    proc = start_publisher(server, source, "none")
    try:
        line = read_line(proc, 120)
    finally:
        proc.wait(60)
        proc.stdout.close()
        proc.stderr.close()
    assert line == f"PUBLISHED {good + 3}" and proc.returncode == 0
    wait_serving(server, NAME, good + 3)
    with server.admin() as admin:
        status = admin.get(f"/v1/values/{NAME}").json()
    assert status["refused"] == [] and status["current_on_disk"] == good + 3
    assert status["versions_on_disk"] == [good, good + 1, good + 2, good + 3]
    assert f"refused value {NAME}@" not in server.log_path.read_text(errors="replace")
    manifest = json.loads((registry.path(NAME, good + 3) / "manifest.json").read_text())
    assert manifest["version"] == good + 3 and os.path.isfile(registry.path(NAME, good + 3) / "head.safetensors")
