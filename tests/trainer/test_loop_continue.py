"""`iro loop --continue` (a new run continues the chain the registry serves) and evaluations that
follow the run's held-out prompts, without a server: the stages are checked on the loop's state."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from common.hashing import sha256_file
from trainer.loop import IroLoop
from trainer.loop_config import LoopConfig
from trainer.loop_state import LoopError, RunState
from trainer.tasks import load_task
from valuefn.checkpoint import ADAPTER_FILE, FORMAT_VERSION, HEAD_FILE
from valuefn.registry import Registry


def publish(registry: Registry, name: str, payload: bytes) -> int:
    """A value version made by hand (not by a loop run), extending the name's chain."""
    def write(d: Path) -> dict[str, str]:
        (d / ADAPTER_FILE).write_bytes(payload)
        (d / HEAD_FILE).write_bytes(payload[::-1])
        return {f: sha256_file(d / f) for f in (ADAPTER_FILE, HEAD_FILE)}

    manifest = {"format_version": FORMAT_VERSION, "name": name, "version": 1, "backbone": {"name": "tiny"},
                "model": {}, "chain": []}
    return registry.publish(name, write, manifest, extend_chain=True)


def make_loop(tmp_path, run="run", *, task=None, continue_chain=True, iterations=1) -> IroLoop:
    config = LoopConfig.from_preset("smoke", iterations=iterations, name="rev", progress=False)
    loop = IroLoop(config, run_dir=tmp_path / run, values_dir=tmp_path / "values", server="http://fake",
                   policies_dir=tmp_path / "policies", task=task, continue_chain=continue_chain)
    loop.state = RunState.open(loop.run_dir, config)
    return loop


def test_a_new_run_continues_the_served_chain(tmp_path):
    registry = Registry(tmp_path / "values")
    assert [publish(registry, "rev", b"one"), publish(registry, "rev", b"two")] == [1, 2]

    loop = make_loop(tmp_path, iterations=2)
    loop._adopt_chain()
    loop._check_registry()  # the served value was not made by this run, and that is allowed now
    assert loop.adopted == [1, 2] and loop.state.data["adopted_from"] == "rev@2"
    assert list(loop.iterations) == [3, 4] and loop.last == 4
    assert loop._value(2) == "rev@2"  # iteration 3's rollouts are guided by the served chain
    assert list(loop._reported()) == [2, 3, 4]  # IRO-2 (the "before") and the run's own
    saved = RunState.open(loop.run_dir, loop.config).data  # recorded: a resumed run continues the same chain
    assert saved["adopted"] == [1, 2] and saved["versions"] == {"1": 1, "2": 2}

    publish(registry, "rev", b"three")  # someone else publishes meanwhile: the run's iteration 3 must follow v2
    resumed = make_loop(tmp_path, iterations=2)
    resumed._adopt_chain()
    assert resumed.adopted == [1, 2]
    with pytest.raises(LoopError, match="CURRENT v3"):
        resumed._check_registry()


def test_continue_refuses_a_missing_value_and_a_run_with_its_own_iterations(tmp_path):
    with pytest.raises(LoopError, match="'rev' is not in"):
        make_loop(tmp_path)._adopt_chain()

    Registry(tmp_path / "values")
    publish(Registry(tmp_path / "values"), "rev", b"one")
    fresh = make_loop(tmp_path, "other", continue_chain=False)
    with pytest.raises(LoopError, match="was not made by this run"):  # without --continue the name is taken
        fresh._check_registry()
    fresh.state.set_version(1, 1)
    with pytest.raises(LoopError, match="already ran its own iterations"):
        make_loop(tmp_path, "other")._adopt_chain()


def test_evaluations_on_other_held_out_prompts_run_again(tmp_path):
    task = load_task("review-sentiment")
    loop = make_loop(tmp_path, task=task, continue_chain=False)
    mine = loop._eval_set()
    for key, eval_set in [("it1/eval", "0123456789abcdef"), ("it2/eval", mine), ("baselines/v2", "0123456789abcdef")]:
        loop.state.finish(key, {"seconds": 1.0, "eval_set": eval_set})
    loop.state.finish("it1/train", {"seconds": 1.0})
    loop.state.finish("it0/eval", {"seconds": 1.0})  # recorded before evaluations named their prompts: kept
    loop._forget_other_evaluations()
    assert set(loop.state.data["stages"]) == {"it2/eval", "it1/train", "it0/eval"}

    other = make_loop(tmp_path, "stored", task=replace(task, eval=task.eval[1:]), continue_chain=False)
    assert other._eval_set() != mine  # another prompt set has another identity
