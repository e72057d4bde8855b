"""Batch lines yield to interactive traffic (server.priority): the watch's wait on a scripted clock
(no real time), a low-priority search waiting before every step, and an interactive
search (the variable unset) never waiting."""

from __future__ import annotations

import asyncio

import pytest

from server.priority import LOW_PRIORITY, InteractiveWatch
from server.search import Searcher
from tests.server.test_search import PROMPT, Chain, CountingScorer, decode
from tests.server.test_search_modes import MODES, StepEngine, params


class Traffic:
    """Interactive requests on a scripted clock: `busy_until` (clock seconds) while they run. The
    watch's sleep advances the clock, so a wait costs no real time."""

    def __init__(self, busy_until: float = 0.0):
        self.now, self.busy_until, self.sleeps = 0.0, busy_until, 0

    def busy(self) -> bool:
        return self.now < self.busy_until

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds

    def watch(self, **kw) -> InteractiveWatch:
        return InteractiveWatch(self.busy, monotonic=lambda: self.now, sleep=self.sleep, poll=0.25, **kw)


def test_no_wait_without_recent_interactive_traffic():
    traffic = Traffic(busy_until=0.0)
    watch = traffic.watch(cooldown=1.0, max_wait=2.0)
    assert asyncio.run(watch.wait()) == 0.0 and traffic.sleeps == 0 and watch.waits == 0


def test_waits_until_a_cooldown_after_the_last_interactive_request():
    traffic = Traffic(busy_until=0.45)  # a request runs until 0.45 s
    waited = []
    watch = traffic.watch(cooldown=1.0, max_wait=5.0, on_wait=waited.append)
    assert asyncio.run(watch.wait()) == pytest.approx(1.25)  # last seen busy at 0.25 (polls of 0.25 s), quiet at 1.25
    assert waited == [pytest.approx(1.25)] and watch.waits == 1 and watch.waited_s == pytest.approx(1.25)


def test_a_wait_is_bounded_so_a_batch_is_never_starved():
    traffic = Traffic(busy_until=float("inf"))  # interactive requests that never pause
    watch = traffic.watch(cooldown=1.0, max_wait=2.0)
    assert asyncio.run(watch.wait()) == pytest.approx(2.0)
    assert asyncio.run(traffic.watch(cooldown=1.0, max_wait=0.0).wait()) == 0.0  # 0: never waits


def low_priority_search(mode, watch):
    async def go():
        LOW_PRIORITY.set(watch)  # as the batch runner does in a line's task
        return await Searcher(StepEngine(), CountingScorer(3), decode=decode).run(Chain([1.0]), PROMPT, params(**mode))

    return asyncio.run(go())


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["mode"])
def test_a_batch_lines_search_waits_before_each_step(mode):
    traffic = Traffic(busy_until=float("inf"))
    watch = traffic.watch(cooldown=1.0, max_wait=2.0)
    result = low_priority_search(mode, watch)
    assert result.steps > 1
    assert watch.waits == result.steps
    assert result.yielded_s == pytest.approx(2.0 * result.steps)
    same = asyncio.run(Searcher(StepEngine(), CountingScorer(3), decode=decode).run(Chain([1.0]), PROMPT,
                                                                                   params(**mode)))
    assert [b.token_ids for b in same.beams] == [b.token_ids for b in result.beams]  # waiting changes no answer
    assert same.yielded_s == 0.0  # interactive: the variable is not set, nothing waits


def test_a_batch_lines_best_of_n_waits_once_before_its_one_engine_request():
    traffic = Traffic(busy_until=float("inf"))
    watch = traffic.watch(cooldown=1.0, max_wait=2.0)
    result = low_priority_search(dict(mode="bon", k=4), watch)
    assert watch.waits == 1 and result.yielded_s == pytest.approx(2.0) and len(result.beams) >= 1


def test_a_quiet_server_costs_a_batch_line_no_wait():
    traffic = Traffic(busy_until=0.0)
    watch = traffic.watch(cooldown=1.0, max_wait=2.0)
    result = low_priority_search(MODES[0], watch)
    assert result.steps > 1 and result.yielded_s == 0.0 and traffic.sleeps == 0
