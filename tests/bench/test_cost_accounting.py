"""`iro bench`'s cost per generated token: CPU core-seconds read over a (fake) server process tree,
per arm and per round, and the ratios to CBS (no server, no psutil process read)."""

from __future__ import annotations

from collections import namedtuple

import psutil
import pytest

import bench.guided
import bench.server
from bench.guided import COST_ARMS, measure_plain_vs_guided
from bench.server import cpu_spent, process_tree_cpu

Times = namedtuple("Times", "user system children_user children_system")


class FakeProcess:
    """psutil.Process over a dict tree: {pid: {"name", "user", "system", "children", "gone"}}."""

    tree: dict[int, dict] = {}

    def __init__(self, pid: int):
        self.pid = pid

    def name(self) -> str:
        return self.tree[self.pid]["name"]

    def cpu_times(self) -> Times:
        node = self.tree[self.pid]
        if node.get("gone"):
            raise psutil.NoSuchProcess(self.pid)
        return Times(node["user"], node["system"], 100.0, 100.0)  # reaped children's time: never counted

    def children(self, recursive: bool = False) -> list["FakeProcess"]:
        out = []
        for c in self.tree[self.pid].get("children", []):
            out.append(FakeProcess(c))
            out += FakeProcess(c).children(True) if recursive else []
        return out


def server_tree() -> dict[int, dict]:
    return {10: {"name": "python", "user": 5.0, "system": 1.0, "children": [11, 13]},
            11: {"name": "VLLM::EngineCore", "user": 20.0, "system": 2.0, "children": [12]},
            12: {"name": "VLLM::Worker", "user": 30.0, "system": 3.0},
            13: {"name": "resource_tracker", "user": 0.5, "system": 0.0, "gone": True}}


def test_the_tree_is_read_as_user_plus_system_per_live_process(monkeypatch):
    monkeypatch.setattr(FakeProcess, "tree", server_tree())
    snap = process_tree_cpu(10, process=FakeProcess)
    assert snap == {10: ("api", 6.0), 11: ("VLLM::EngineCore", 22.0), 12: ("VLLM::Worker", 33.0)}  # 13 exited


def test_cpu_spent_sums_every_process_once_by_role():
    before = {10: ("api", 6.0), 11: ("VLLM::EngineCore", 22.0), 12: ("VLLM::Worker", 33.0), 14: ("old", 9.0)}
    after = {10: ("api", 7.5), 11: ("VLLM::EngineCore", 24.0), 12: ("VLLM::Worker", 40.0), 15: ("VLLM::Worker", 1.0)}
    spent = cpu_spent(before, after)
    assert spent == {"api": 1.5, "VLLM::EngineCore": 2.0, "VLLM::Worker": 8.0, "total": 11.5, "ended": 1}


def test_each_arm_is_charged_the_cpu_its_requests_cost_and_ratios_are_medians_of_rounds(monkeypatch):
    """Each arm's requests advance the fake engine core and worker by a known amount: CBS 0.04 core-s
    per token, PF 0.03, DVTS 0.05, plain 0.01; wall times drift from round to round, the CPU ratios
    do not."""
    tree = server_tree()
    monkeypatch.setattr(FakeProcess, "tree", tree)
    monkeypatch.setattr(bench.server, "process_tree_cpu", lambda pid: process_tree_cpu(pid, process=FakeProcess))
    per_token = {"plain": 0.01, "cbs": 0.04, "pf": 0.03, "dvts": 0.05}
    drift = iter([1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 1.5, 1.5, 1.5, 1.5])  # per arm, rounds in turn

    def fake_post_all(url, bodies):
        arm = ("plain" if "guidance" not in bodies[0] else bodies[0]["guidance"].get("mode", "cbs"))
        tokens = 100 * len(bodies)
        tree[11]["user"] += per_token[arm] * tokens / 2
        tree[12]["user"] += per_token[arm] * tokens / 2
        return next(drift) * per_token[arm] * tokens, [{"usage": {"completion_tokens": 100}} for _ in bodies]

    monkeypatch.setattr(bench.guided, "_post_all", lambda url, bodies: _done(fake_post_all(url, bodies)))
    out = measure_plain_vs_guided("http://fake", "m", rounds=3, arms=COST_ARMS, pid=10, prompts=["a", "b"])
    assert out["cost"]["pf"]["cpu_core_seconds_per_token"] == pytest.approx(0.03)
    assert out["cost"]["cbs"]["cpu_core_seconds_by_process"] == {"api": 0.0, "VLLM::EngineCore": pytest.approx(4.0),
                                                                  "VLLM::Worker": pytest.approx(4.0)}
    r = out["cost_ratios"]
    assert r["pf_vs_cbs_cpu_per_token"] == pytest.approx(0.75) and r["dvts_vs_cbs_cpu_per_token"] == pytest.approx(1.25)
    assert r["cbs_vs_plain_cpu_per_token"] == pytest.approx(4.0)
    assert r["pf_vs_cbs_wall_per_token"] == pytest.approx(0.75)  # drift hits every arm of a round alike
    assert out["cost"]["cbs"]["seconds_rounds"] == pytest.approx([8.0, 16.0, 12.0])
    assert out["guided_engine_value_seconds"] == pytest.approx(12.0)  # the report's older fields still there


async def _done(value):
    return value
