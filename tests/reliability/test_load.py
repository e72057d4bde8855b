"""A 30-second load run against the shared server (`bench/load.py`; the 5-minute, 64-client run is
`python -m bench.load --clients 64 --duration 300 ...`, whose report includes RSS growth)."""

from __future__ import annotations

import pytest

from bench.load import LoadConfig, run_load
from tests.e2e.test_guided import iro_values_init, wait_serving

pytestmark = pytest.mark.e2e
CLIENTS = 32


def test_mixed_load_has_no_errors_and_drains(server):
    version = iro_values_init(server, "load")
    wait_serving(server, "load", version)
    report = run_load(LoadConfig(url=server.url, api_key=server.api_key, clients=CLIENTS, duration=30, warmup=5,
                                 value="load", max_tokens=8, pid=server.proc.pid, request_timeout=120))
    print("\n" + report.summary())
    assert report.errors == 0, report.error_samples
    assert report.engine_drained, "engine requests left in flight after the clients stopped"
    assert set(report.requests) == {"plain", "guided", "stream", "cancel"}, report.requests
    assert report.cancelled > 0 and report.latency_by_kind["guided"]["n"] > 0
    assert report.rss_warm_mib and report.rss_end_mib  # growth is judged on the 5-minute run only
