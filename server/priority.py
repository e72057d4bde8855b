"""Batch work yields to interactive traffic between search steps.

A batch line runs with `LOW_PRIORITY` set to the runner's `InteractiveWatch`; a guided search that
sees it waits before each of its steps while interactive requests are in progress
or were seen less than `cooldown` seconds ago, so the engine's steps go to the interactive requests
instead of being shared with a batch line's candidates. `max_wait` bounds each wait: under
interactive traffic that never pauses a batch line still takes one step per `max_wait` seconds, so
a batch slows down but is never starved.

    watch = InteractiveWatch(lambda: serving._admitted > 0, cooldown=1.0, max_wait=2.0)
    LOW_PRIORITY.set(watch)              # in the batch line's task (context variables follow its tasks)
    ...                                  # the search, before each step: `await yield_to_interactive()`
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar


class InteractiveWatch:
    """Whether interactive requests ran recently (`busy()`, polled), and the wait of low-priority work.

    `monotonic` and `sleep` are injectable for tests; `waited_s` and `waits` sum what `wait` spent."""

    def __init__(self, busy: Callable[[], bool], *, cooldown: float = 1.0, max_wait: float = 2.0,
                 poll: float = 0.02, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, on_wait: Callable[[float], None] | None = None):
        self.busy, self.cooldown, self.max_wait, self.poll = busy, cooldown, max_wait, poll
        self.monotonic, self.sleep, self.on_wait = monotonic, sleep, on_wait
        self._seen = -float("inf")
        self.waited_s, self.waits = 0.0, 0

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


LOW_PRIORITY: ContextVar[InteractiveWatch | None] = ContextVar("iro_low_priority", default=None)
"""Set in a batch line's task: the watch its searches yield to (None: interactive work)."""


async def yield_to_interactive() -> float:
    """In a batch line (`LOW_PRIORITY` set): wait while interactive requests are recent, at most the
    watch's `max_wait`; returns the seconds waited (0 for interactive work)."""
    watch = LOW_PRIORITY.get()
    return 0.0 if watch is None else await watch.wait()


__all__ = ["InteractiveWatch", "LOW_PRIORITY", "yield_to_interactive"]
