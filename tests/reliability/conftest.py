"""Helpers of the reliability tier: reading /metrics, bounded polling, publishing values."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0.0 when the series does not exist yet)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_until(probe: Callable[[], T], done: Callable[[T], bool], timeout: float, interval: float = 0.1) -> T:
    """Poll `probe()` until `done(value)` or the deadline; return the last value (callers assert on it)."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(interval)  # bounded polling of observable state, not a fixed wait
        value = probe()
    return value


def engine_core_pid(server_pid: int) -> int | None:
    """The pid of the vLLM EngineCore child process of a server (None if there is none yet)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        if ppid == server_pid and "EngineCor" in comm:
            return int(stat.parent.name)
    return None
