"""SIGTERM while the engine is still starting: the server waits for it, shuts it down and exits,
leaving no orphaned vLLM EngineCore process behind (it used to keep ~0.5 GB forever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port
from tests.reliability.conftest import alive, engine_core_pid, wait_until

pytestmark = pytest.mark.e2e


def test_sigterm_during_startup_leaves_no_engine_process(tmp_path):
    env = {**os.environ, "IRO_VALUES_DIR": str(tmp_path / "values"), "IRO_PORT": str(free_port()),
           "IRO_MAX_NUM_BATCHED_TOKENS": "256"}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "iro.cli", "serve"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        core = wait_until(lambda: engine_core_pid(proc.pid), lambda pid: pid is not None or proc.poll() is not None,
                          timeout=180)
        assert core is not None, (tmp_path / "server.log").read_text(errors="replace")[-3000:]
        proc.send_signal(signal.SIGTERM)  # the engine is still loading the model
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    orphaned = wait_until(lambda: alive(core), lambda a: not a, timeout=15)
    if orphaned:
        os.kill(core, signal.SIGKILL)  # don't leave it eating memory
    assert not orphaned, "orphaned EngineCore process"
