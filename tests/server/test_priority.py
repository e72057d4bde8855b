"""Batch lines yield to interactive traffic (server.priority): the watch's wait on a scripted clock
(no real time), a low-priority search waiting before every step, an interactive
search (the variable unset) never waiting, and a batch line's engine request that an interactive
request interrupts cancelled and run again (`preemptible`), at most `max_preemptions` times."""

from __future__ import annotations

import asyncio

import pytest

from server.priority import LOW_PRIORITY, InteractiveWatch, preemptible
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
        await asyncio.sleep(0)  # other tasks run (a request the watch polls for)

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
    assert watch.waits == 2 * result.steps  # before each step's engine requests and before its scorer pass
    assert result.yielded_s == pytest.approx(2.0 * 2 * result.steps)
    same = asyncio.run(Searcher(StepEngine(), CountingScorer(3), decode=decode).run(Chain([1.0]), PROMPT,
                                                                                   params(**mode)))
    assert [b.token_ids for b in same.beams] == [b.token_ids for b in result.beams]  # waiting changes no answer
    assert same.yielded_s == 0.0  # interactive: the variable is not set, nothing waits


def test_a_batch_lines_best_of_n_waits_before_its_one_engine_request_and_its_scorer_pass():
    traffic = Traffic(busy_until=float("inf"))
    watch = traffic.watch(cooldown=1.0, max_wait=2.0)
    result = low_priority_search(dict(mode="bon", k=4), watch)
    assert watch.waits == 2 and result.yielded_s == pytest.approx(4.0) and len(result.beams) >= 1


def test_a_quiet_server_costs_a_batch_line_no_wait():
    traffic = Traffic(busy_until=0.0)
    watch = traffic.watch(cooldown=1.0, max_wait=2.0)
    result = low_priority_search(MODES[0], watch)
    assert result.steps > 1 and result.yielded_s == 0.0 and watch.waits == 0 and watch.preemptions == 0


class Interrupted:
    """An engine request of a batch line: each attempt is counted; the first `interrupt` attempts see
    an interactive request arrive (for 2 s) while they run, the others run 1 s on the clock."""

    def __init__(self, traffic: Traffic, interrupt: int = 1):
        self.traffic, self.interrupt = traffic, interrupt
        self.started = self.cancelled = 0

    async def __call__(self) -> str:
        self.started += 1
        attempt = self.started
        try:
            if attempt <= self.interrupt:
                self.traffic.busy_until = self.traffic.now + 2.0
            for _ in range(40):  # many turns of the event loop, as an engine request takes
                await self.traffic.sleep(0.025)
            return f"answer of attempt {attempt}"
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def run_low_priority(watch, run):
    async def go():
        LOW_PRIORITY.set(watch)
        return await preemptible(run)

    return asyncio.run(go())


def test_an_interactive_arrival_cancels_a_batch_request_which_runs_again_after_the_wait():
    traffic = Traffic()
    preempted = []
    watch = traffic.watch(cooldown=1.0, max_wait=5.0, max_preemptions=2, on_preempt=lambda: preempted.append(1))
    run = Interrupted(traffic, interrupt=1)
    assert run_low_priority(watch, run) == "answer of attempt 2"
    assert (run.started, run.cancelled, watch.preemptions, preempted) == (2, 1, 1, [1])
    assert watch.waits == 1 and watch.waited_s >= 1.0  # waited for the interactive request and the cool-down
    assert asyncio.run(preemptible(Interrupted(Traffic(), interrupt=1))) == "answer of attempt 1"  # interactive work


def test_a_request_is_preempted_at_most_max_preemptions_times():
    for limit in (0, 1, 2):
        traffic = Traffic()
        watch = traffic.watch(cooldown=1.0, max_wait=5.0, max_preemptions=limit)
        run = Interrupted(traffic, interrupt=5)  # every attempt is interrupted
        assert run_low_priority(watch, run) == f"answer of attempt {limit + 1}"
        assert (run.cancelled, watch.preemptions) == (limit, limit)


def test_a_request_that_starts_while_interactive_traffic_runs_is_not_preempted():
    """Its wait reached max_wait (interactive traffic that never pauses): it runs to its end, so the
    batch progresses."""
    traffic = Traffic(busy_until=float("inf"))
    watch = traffic.watch(cooldown=1.0, max_wait=2.0, max_preemptions=2)
    run = Interrupted(traffic, interrupt=0)
    assert run_low_priority(watch, run) == "answer of attempt 1" and run.cancelled == 0 and watch.preemptions == 0


def test_batch_requests_beside_interactive_traffic_run_one_at_a_time():
    """Lines whose waits reached max_wait together do not all run beside the interactive request."""
    traffic = Traffic(busy_until=float("inf"))
    watch = traffic.watch(cooldown=1.0, max_wait=2.0, max_preemptions=2)
    running, most = [0], [0]

    async def request(i: int) -> int:
        running[0] += 1
        most[0] = max(most[0], running[0])
        for _ in range(3):
            await traffic.sleep(0.1)
        running[0] -= 1
        return i

    async def go():
        LOW_PRIORITY.set(watch)
        return await asyncio.gather(*[preemptible(lambda i=i: request(i)) for i in range(4)])

    assert asyncio.run(go()) == [0, 1, 2, 3] and most == [1] and watch.preemptions == 0
    traffic.busy_until = 0.0  # a quiet server: the batch's requests run together
    for limit in (2, 0):  # also when preemption is off
        watch.max_preemptions = limit
        running, most = [0], [0]
        assert asyncio.run(go()) == [0, 1, 2, 3] and most == [4]


class InterruptedEngine(StepEngine):
    """The first engine request of a search sees an interactive request arrive while it runs."""

    def __init__(self, traffic: Traffic, **kw):
        super().__init__(**kw)
        self.traffic, self.calls = traffic, 0

    async def sample(self, request):
        self.calls += 1
        if self.calls == 1:
            self.traffic.busy_until = self.traffic.now + 2.0
            await self.traffic.sleep(0.25)
            await asyncio.Event().wait()  # never answers: it must be cancelled
        return await super().sample(request)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["mode"])
def test_a_preempted_search_step_runs_again_and_the_answer_is_unchanged(mode):
    traffic = Traffic()
    watch = traffic.watch(cooldown=1.0, max_wait=5.0, max_preemptions=2)
    engine = InterruptedEngine(traffic)

    async def go():
        LOW_PRIORITY.set(watch)
        return await Searcher(engine, CountingScorer(3), decode=decode).run(Chain([1.0]), PROMPT, params(**mode))

    result = asyncio.run(go())
    assert watch.preemptions == 1 and result.steps > 1
    same = asyncio.run(Searcher(StepEngine(), CountingScorer(3), decode=decode).run(Chain([1.0]), PROMPT,
                                                                                   params(**mode)))
    assert [b.token_ids for b in same.beams] == [b.token_ids for b in result.beams]


def test_a_preempted_plain_batch_request_answers_from_its_new_attempt():
    """PlainGenerator (a plain batch line's choices): the interrupted engine stream is closed (vLLM
    aborts the request) and the next attempt's final output is the answer."""
    from common.sampling import Generation
    from server.openai.generate import PlainGenerator
    from tests.server.conftest import ScriptedEngine

    traffic = Traffic()

    class Engine(ScriptedEngine):
        calls = 0

        async def stream(self, request, request_id, *, delta=False):
            Engine.calls += 1
            if Engine.calls == 1:
                traffic.busy_until = traffic.now + 2.0
                yield self._output(list("ab"), request, None)
                await asyncio.Event().wait()
            async for out in super().stream(request, request_id, delta=delta):
                yield out

    engine = Engine()
    watch = traffic.watch(cooldown=1.0, max_wait=5.0, max_preemptions=2)

    async def go():
        LOW_PRIORITY.set(watch)
        return await PlainGenerator(engine).run([[1, 2]], Generation(max_tokens=5))

    outcome = asyncio.run(go())
    assert [c.text for c in outcome.choices[0]] == ["abcde"] and outcome.completion_tokens == 5
    assert Engine.calls == 2 and watch.preemptions == 1 and engine.closed == 1  # the first stream was closed
