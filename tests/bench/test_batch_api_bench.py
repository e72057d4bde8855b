"""bench/batch_api.py's parts without a server: the interactive prober's seeded pauses (the
README matches each latency with the pause before it, so the pauses must be reproducible), and the
report's rows for the new counters."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

from bench.batch_api import interactive, markdown, summary


class Client:
    """The openai client's `chat.completions.create`, counting calls."""

    def __init__(self):
        self.calls = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, **kw):
        self.calls += 1
        assert kw["max_tokens"] == 8 and kw["temperature"] == 0


def test_the_prober_pauses_are_seeded_exponential_and_back_to_back_has_none(monkeypatch):
    pauses = []
    monkeypatch.setattr("bench.batch_api.time.sleep", pauses.append)
    client = Client()
    assert len(interactive(client, "m", None, 5, gap_s=2.0, seed=7)) == 5 and client.calls == 5
    rng = random.Random(7)
    assert pauses == [rng.expovariate(1 / 2.0) for _ in range(4)]  # none before the first request
    pauses.clear()
    interactive(client, "m", None, 3)
    assert pauses == []
    stop = threading.Event()
    stop.set()
    assert interactive(client, "m", stop, None, gap_s=2.0) == []  # a set stop ends the probe at once


def test_summary_keeps_every_latency_and_the_report_names_preemptions():
    during = summary([0.3, 0.5, 0.4, 0.9])
    assert during["latencies_s"] == [0.3, 0.5, 0.4, 0.9] and during["n"] == 4 and during["p50_s"] == 0.45
    batch = {"wall_s": 10.0, "answers": 4, "output_tokens": 40, "tokens_per_s": 4.0, "interactive_errors": 0,
             "yield_seconds": 3.5, "preemptions": 12.0}
    result = {"batch": batch, "interactive_idle": summary([0.2, 0.25]), "interactive_during_batch": during,
              "probe_gap_s": 2.0, "batch_max_preemptions": 2, "batch_yield_max_s": None, "date": "d",
              "machine": "cpu", "cores": 2, "load_average_before": [0.0], "load_average_after": [0.0],
              "lines": 4, "guided_lines": 1, "max_tokens": 16, "batch_concurrency": 4, "command": "c"}
    text = markdown(result)
    assert "pauses of mean 2.0 s during the batch" in text
    assert "cancelled for an arriving interactive request and run again: 12 " in text
    assert "--batch-max-preemptions per request, 2)" in text
    assert "back to back" in markdown({**result, "probe_gap_s": 0.0})
