"""Stopping the server while the engine is still starting: the lifespan waits for the engine and
shuts it down, instead of cancelling the start and orphaning the vLLM EngineCore process (which
then kept ~0.5 GB forever, reparented to init). A scripted slow engine start stands in for vLLM,
so this runs in a second instead of a ~40-120 s real start."""

from __future__ import annotations

import asyncio
import threading

import server.app
from server.app import build_app
from server.settings import ServerSettings


class SlowEngine:
    errored = False
    stopped = False

    def in_flight(self) -> int:
        return 0

    def shutdown(self) -> None:
        SlowEngine.stopped = True


async def test_stop_while_the_engine_starts_still_shuts_it_down(monkeypatch, tmp_path):
    building, finish = threading.Event(), threading.Event()

    async def slow_start(app, settings):
        def build():
            building.set()
            finish.wait(30)  # the model is still loading
            return SlowEngine()
        app.state.engine = await asyncio.to_thread(build)

    monkeypatch.setattr(server.app, "_start_engine", slow_start)
    app = build_app(ServerSettings(values_dir=tmp_path))
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(building.wait, 30)
        asyncio.get_running_loop().call_later(0.2, finish.set)  # loading ends after the shutdown began
    assert SlowEngine.stopped, "the engine that finished starting during shutdown was never shut down"
