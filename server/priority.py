"""Batch work yields to interactive traffic between search steps.

A batch line runs with `LOW_PRIORITY` set to the runner's `InteractiveWatch`; a guided search that
sees it waits before each of its steps while interactive requests are in progress
or were seen less than `cooldown` seconds ago, so the engine's steps go to the interactive requests
instead of being shared with a batch line's candidates. `max_wait` bounds each wait: under
interactive traffic that never pauses a batch line still takes one step per `max_wait` seconds, so
a batch slows down but is never starved.

An engine request of a batch line that started while no interactive request was recent is also
*preempted* when one arrives (`preemptible`): it is cancelled (vLLM aborts it, so the engine's
steps stop being shared at once), waits like a step, and runs again from its start. Its caller only
reads the final output (a search step's samples, a plain line's choices), so the retry is invisible
but for the time; with a `seed` it gives the same answer. A request that starts while interactive
requests are still recent (its wait reached `max_wait`) or was preempted `max_preemptions` times
runs to its end, so a batch still always progresses; such requests run one at a time.

    watch = InteractiveWatch(lambda: serving._admitted > 0, cooldown=1.0, max_wait=2.0)
    LOW_PRIORITY.set(watch)              # in the batch line's task (context variables follow its tasks)
    ...                                  # the search, before each step: `await yield_to_interactive()`
    samples = await preemptible(lambda: engine.sample(request))   # every engine request of the line
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


class InteractiveWatch:
    """Whether interactive requests ran recently (`busy()`, polled), and the wait of low-priority work.

    `monotonic` and `sleep` are injectable for tests; `waited_s` and `waits` sum what `wait` spent,
    `preemptions` counts the engine requests `preemptible` cancelled (at most `max_preemptions` per
    request; 0: none is)."""

    def __init__(self, busy: Callable[[], bool], *, cooldown: float = 1.0, max_wait: float = 2.0,
                 max_preemptions: int = 8, poll: float = 0.02, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_wait: Callable[[float], None] | None = None, on_preempt: Callable[[], None] | None = None):
        self.busy, self.cooldown, self.max_wait, self.poll = busy, cooldown, max_wait, poll
        self.max_preemptions = max_preemptions
        self.monotonic, self.sleep, self.on_wait, self.on_preempt = monotonic, sleep, on_wait, on_preempt
        self._seen = -float("inf")
        self.waited_s, self.waits, self.preemptions = 0.0, 0, 0
        self._poller: asyncio.Task | None = None
        self._arrived: asyncio.Future | None = None
        self._waiting = 0
        self._forced: asyncio.Semaphore | None = None
        self._forced_loop: asyncio.AbstractEventLoop | None = None

    def recent(self) -> bool:
        """An interactive request is in progress, or one was seen less than `cooldown` seconds ago."""
        now = self.monotonic()
        if self.busy():
            self._seen = now
        return now - self._seen < self.cooldown

    async def wait(self) -> float:
        """Wait while `recent()`, at most `max_wait` seconds; returns the seconds waited."""
        if self.max_wait <= 0 or not self.recent():
            return 0.0
        start = self.monotonic()
        while self.monotonic() - start < self.max_wait and self.recent():
            await self.sleep(self.poll)
        waited = self.monotonic() - start
        self.waited_s += waited
        self.waits += 1
        if self.on_wait is not None:
            self.on_wait(waited)
        return waited

    async def arrival(self) -> None:
        """Return once an interactive request is in progress. One task polls `busy()` every `poll`
        seconds for all the requests waiting for it, and only while any is."""
        loop = asyncio.get_running_loop()
        if self._poller is None or self._poller.done() or self._poller.get_loop() is not loop:
            self._arrived = loop.create_future()
            self._poller = loop.create_task(self._poll(self._arrived))
        arrived = self._arrived
        self._waiting += 1
        try:
            await asyncio.shield(arrived)
        finally:
            self._waiting -= 1
            if not self._waiting and not arrived.done():
                self._poller.cancel()

    async def _poll(self, arrived: asyncio.Future) -> None:
        while not self.busy():
            await self.sleep(self.poll)
        self._seen = self.monotonic()
        arrived.set_result(None)

    def forced(self) -> asyncio.Semaphore:
        """Held by a batch request that runs beside interactive requests (its wait reached
        `max_wait`, or it was preempted `max_preemptions` times): the lines whose waits end together
        then run one at a time, not all at once beside the interactive request."""
        loop = asyncio.get_running_loop()
        if self._forced_loop is not loop:
            self._forced, self._forced_loop = asyncio.Semaphore(1), loop
        return self._forced

    def preempted(self) -> None:
        self.preemptions += 1
        if self.on_preempt is not None:
            self.on_preempt()


LOW_PRIORITY: ContextVar[InteractiveWatch | None] = ContextVar("iro_low_priority", default=None)
"""Set in a batch line's task: the watch its searches yield to (None: interactive work)."""


async def yield_to_interactive() -> float:
    """In a batch line (`LOW_PRIORITY` set): wait while interactive requests are recent, at most the
    watch's `max_wait`; returns the seconds waited (0 for interactive work)."""
    watch = LOW_PRIORITY.get()
    return 0.0 if watch is None else await watch.wait()


async def preemptible(run: Callable[[], Awaitable[T]]) -> T:
    """`await run()`, an engine request whose caller reads only its final output. In a batch line
    (`LOW_PRIORITY` set) it is preempted when an interactive request arrives while it runs: cancelled
    (vLLM aborts it), then after the watch's wait started again; it runs to its end when it starts
    while interactive requests are recent (the wait reached `max_wait`) or after `max_preemptions`,
    one such request at a time (`InteractiveWatch.forced`)."""
    watch = LOW_PRIORITY.get()
    if watch is None:
        return await run()
    preempted = 0
    while preempted < watch.max_preemptions and not watch.recent():
        task = asyncio.ensure_future(run())
        arrival = asyncio.ensure_future(watch.arrival())
        try:
            await asyncio.wait({task, arrival}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled: so is the engine request
            task.cancel()
            raise
        finally:
            arrival.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            preempted += 1
            watch.preempted()
            await watch.wait()
        else:  # it finished as the interactive request arrived: keep its answer
            return task.result()
    if not watch.recent():  # a quiet server (preemptions used up, or none allowed): no reason to queue
        return await run()
    async with watch.forced():  # beside interactive requests: one batch request at a time
        return await run()


__all__ = ["InteractiveWatch", "LOW_PRIORITY", "preemptible", "yield_to_interactive"]
