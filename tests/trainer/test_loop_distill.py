"""The loop's distillation stages with a scripted server (the real `IroClient` over an
`httpx.MockTransport`) and a tiny random Llama as the base model: the early check of the server's
policy registry, training and publishing (and adopting after a kill), waiting until served, and the
report's rows and verdict."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from registry.errors import RegistryError
from trainer.distill_config import DistillConfig
from trainer.eval_results import MethodResult
from trainer.loop import IroLoop
from trainer.loop_config import LoopConfig
from trainer.loop_distill import DistillStages
from trainer.loop_state import LoopError, RunState, ServerLink
from trainer.plots import plot_reward_vs_tokens


def make_loop(tmp_path, *, model=None, distill=("is-dpo",), **options) -> IroLoop:
    config = LoopConfig.from_preset("smoke", iterations=1, name="rev", distill=list(distill), progress=False,
                                    **options)
    loop = IroLoop(config, run_dir=tmp_path / "run", values_dir=tmp_path / "values", server="http://fake",
                   policies_dir=tmp_path / "policies", model=model and str(model))
    loop.state = RunState.open(loop.run_dir, config)
    return loop


def make_stages(tmp_path, *replies, models=("base",), **kw) -> DistillStages:
    """The distillation stages of a fresh loop (what `IroLoop.run` drives), against a server that
    answers the policy routes with `replies` (see `scripted`)."""
    loop = make_loop(tmp_path, **kw)
    loop.server = ServerLink("http://fake", admin_key="admin", transport=scripted(*replies, models=models))
    return loop.distiller()


def scripted(*replies, models=("base",)):
    """A server that answers GET /v1/policies[/NAME] with the next (status, body) (the last one again
    once the others are used) and /v1/models with `models`; `.paths` records what was asked."""
    replies, paths = list(replies), []

    def handle(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in models]})
        assert request.headers["authorization"] == "Bearer admin"  # the admin key reaches the admin routes
        status, body = replies.pop(0) if len(replies) > 1 else replies[0]
        return httpx.Response(status, json=body)

    transport = httpx.MockTransport(handle)
    transport.paths = paths
    return transport


def policy(version, refused=()):
    """GET /v1/policies/rev-is-dpo's body: serving `version`, with `refused` as (version, reason)."""
    return {"name": "rev-is-dpo", "model": "rev-is-dpo", "root": "base", "serving_version": version,
            "refused": [{"version": v, "reason": r, "at": 0.0} for v, r in refused]}


def error(status, code):
    return (status, {"error": {"message": code, "type": "invalid_request_error", "param": None, "code": code}})


def test_distill_option_takes_lists_commas_and_presets():
    assert LoopConfig.from_preset("smoke", distill=["apa,is-dpo", "apa"]).distill == ["apa", "is-dpo"]
    assert LoopConfig.from_preset("smoke", distill="is-dpo").distill == ["is-dpo"]
    assert LoopConfig.from_preset("full").distill == []
    with pytest.raises(ValueError, match="distill"):
        LoopConfig.from_preset("smoke", distill=["sft"])
    with pytest.raises(ValueError, match="lamda"):  # a bad distillation option is refused before any work
        LoopConfig.from_preset("smoke", distill=["apa"], **{"distill_options.lamda": "1"})
    smoke = LoopConfig.from_preset("smoke", distill=["apa"]).distill_config("apa")
    # the trainer samples held-out prompts to select its checkpoint, as `iro distill` does
    assert smoke.max_steps == 2 and smoke.method == "apa"
    assert smoke.eval_prompts == DistillConfig.from_preset("smoke").eval_prompts > 0


def test_distill_options_named_after_a_method_apply_to_it_alone():
    config = LoopConfig.from_preset("smoke", distill=["apa", "is-dpo"],
                                    **{"distill_options.lr": "3e-4", "distill_options.apa.lam": "0.025",
                                       "distill_options.is-dpo.epochs": "3"})
    apa, dpo = config.distill_config("apa"), config.distill_config("is-dpo")
    assert (apa.lr, apa.lam, apa.epochs) == (3e-4, 0.025, 1) and (dpo.lr, dpo.epochs) == (3e-4, 3)
    assert dpo.lam != 0.025
    full = LoopConfig.from_preset("full", distill=["apa", "is-dpo"])  # the preset's measured settings
    assert (full.distill_config("apa").lam, full.distill_config("is-dpo").lr) == (0.007, 3e-4)
    assert DistillConfig.from_preset("full", method="apa").lam == 0.01  # the loop's own per-method option wins
    # the stock-phrase penalty keeps distinct-2 inside its bound for longer, so each method's KL budget is larger
    apa = full.distill_config("apa")
    assert (apa.overuse_weight, apa.kl_budget, apa.kl_every) == (0.05, 0.2, 10)
    dpo = full.distill_config("is-dpo")
    assert (dpo.overuse_weight, dpo.epochs, dpo.kl_budget, dpo.kl_every, dpo.eval_every) == (0.075, 3, 0.25, 5, 15)
    mine = LoopConfig.from_preset("full", distill=["apa"], **{"distill_options.lam": "0.5"})
    assert mine.distill_config("apa").lam == 0.5  # the user's option for all methods beats the preset's per-method one
    with pytest.raises(ValueError, match="epoch"):  # misspelt inside a method's block: refused too
        LoopConfig.from_preset("smoke", distill=["is-dpo"], **{"distill_options.is-dpo.epoch": "3"})


def test_distillation_can_be_added_to_a_finished_run(tmp_path):
    state = RunState.open(tmp_path / "run", LoopConfig.from_preset("smoke"))
    state.finish("it1/rollout", {"seconds": 1.0})
    again = RunState.open(tmp_path / "run", LoopConfig.from_preset("smoke", distill=["apa"]))
    assert again.stage("it1/rollout") == {"seconds": 1.0} and again.data["config"]["distill"] == ["apa"]
    tuned = LoopConfig.from_preset("smoke", distill=["apa"], distill_preset="full", **{"distill_options.apa.lam": "0.05"})
    again = RunState.open(tmp_path / "run", tuned)  # nothing distilled yet: its settings may still change
    again.finish("distill/apa/train", {"policy": "x"})
    with pytest.raises(LoopError, match="distill_preset"):
        RunState.open(tmp_path / "run", LoopConfig.from_preset("smoke", distill=["apa"]))


def test_distill_name_names_the_policies(tmp_path):
    assert make_loop(tmp_path / "a").distiller().policy_name("apa") == "rev-apa"  # the value's name
    assert make_loop(tmp_path / "b", distill_name="rev-seed1").distiller().policy_name("is-dpo") == "rev-seed1-is-dpo"
    with pytest.raises(RegistryError, match="invalid policy name 'Bad Name!-apa'"):  # refused before any work
        make_loop(tmp_path / "c", distill=["apa"], distill_name="Bad Name!")


@pytest.mark.parametrize("reply, refusal", [
    (error(404, "policies_disabled"), "--policies-dir .*policies"),
    ((200, {"registry": "/elsewhere", "data": []}), "serves the policy registry /elsewhere"),
    (error(401, "invalid_api_key"), r"refused GET /v1/policies \(401\): pass its admin key"),
    (error(403, "admin_key_required"), r"\(403\): pass its admin key"),
])
def test_the_server_must_serve_the_loops_policy_registry(tmp_path, reply, refusal):
    with pytest.raises(LoopError, match=refusal):
        make_stages(tmp_path, reply).check_server()


def test_the_same_policy_registry_passes_the_check(tmp_path):
    stages = make_stages(tmp_path, (200, {"registry": str(tmp_path / "policies"), "data": []}))
    stages.check_server()
    assert stages.server.transport.paths == ["/v1/policies"]


def test_waiting_for_the_policy_and_a_refusal(tmp_path):
    stages = make_stages(tmp_path, error(404, "policy_not_found"), (200, policy(1)), (200, policy(2)),
                         models=("base", "rev-is-dpo"), publish_timeout=30)
    stages.state.finish("distill/is-dpo/train", {"policy": "rev-is-dpo", "version": 2})
    assert stages.serve("is-dpo")["version"] == 2  # unknown at first, then v1, then v2 (listed in /v1/models)
    assert stages.server.transport.paths == ["/v1/policies/rev-is-dpo"] * 3 + ["/v1/models"]
    refused = make_stages(tmp_path / "refused", (200, policy(1, refused=[(2, "hash_mismatch: sha256")])))
    refused.state.finish("distill/is-dpo/train", {"policy": "rev-is-dpo", "version": 2})
    with pytest.raises(LoopError, match="refused policy rev-is-dpo v2: hash_mismatch: sha256"):
        refused.serve("is-dpo")


def labelled_rollouts(path, n_prompts=8, samples=2, seed=0):
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in range(n_prompts):
            prompt = [1] + [rng.randrange(4, 32) for _ in range(4)]
            for j in range(samples):
                response = [rng.randrange(4, 32) for _ in range(6)]
                f.write(json.dumps({"id": f"p{p}:{j}", "prompt_id": f"p{p}", "prompt_token_ids": prompt,
                                    "response_token_ids": response, "reward": rng.random()}) + "\n")


def test_distill_stage_publishes_a_policy_and_adopts_it_after_a_kill(tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny", vocab=32)
    loop = make_stages(tmp_path, model=model)
    labelled_rollouts(loop.run_dir / "it1" / "labelled.jsonl")
    loop.state.set_version(1, 1)
    stale = loop.run_dir / "eval" / "distilled-is-dpo.jsonl"  # an earlier policy's samples under this name
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"prompt_id": "p0", "response": "old"}\n')
    info = loop.train("is-dpo")
    assert info["policy"] == "rev-is-dpo" and info["version"] == 1 and not info["adopted"]
    assert not stale.exists()  # the eval stage samples the new policy instead of resuming from them
    assert info["steps"] == 2 and info["kl_to_base"] is not None and info["distill_seconds"] > 0
    manifest = loop.policies.manifest("rev-is-dpo", 1)
    assert manifest.method == "is-dpo" and manifest.training["loop_run"] == loop.state.run_id
    assert manifest.training["value"] == "rev@1"
    again = loop.train("is-dpo")  # killed before the stage was recorded: adopt, do not train again
    assert again["adopted"] and again["version"] == 1 and loop.policies.versions("rev-is-dpo") == [1]

    other = make_stages(tmp_path / "other", (200, {"registry": str(loop.policies.root), "data": []}),
                        model=model)  # another run may not take over the name
    other.policies = loop.policies
    with pytest.raises(LoopError, match="not made by this run"):
        other.check_server()


def result(label, kind, mean, tokens, *, name=None, d2=0.8, kl=None):
    return MethodResult(name=name or label, label=label, kind=kind, settings="", value=None, versions=[], prompts=8,
                        mean=mean, ci_low=mean - 0.05, ci_high=mean + 0.05, std=0.1, distinct2=d2,
                        tokens=int(tokens * 8), tokens_per_prompt=tokens, seconds=2.0, kl_to_base=kl)


def test_report_rows_verdict_and_plot_of_distilled_policies(tmp_path):
    loop = make_loop(tmp_path, distill=("apa", "is-dpo"))
    state = loop.state
    state.set_version(1, 1)
    state.finish("it1/eval", {"seconds": 5.0, "result": result("IRO-1", "cbs", 0.6, 400).to_dict()})
    state.finish("baselines/v1", {"seconds": 3.0, "results": [result("base (N=1)", "base", 0.2, 40).to_dict(),
                                                              result("Best-of-4", "bon", 0.4, 160).to_dict()]})
    state.finish("distill/apa/eval", {"seconds": 2.0, "distill_seconds": 95.0, "result": result(
        "distilled (APA)", "distilled", 0.5, 40, name="distilled-apa", d2=0.76, kl=0.0312).to_dict()})
    state.finish("distill/is-dpo/eval", {"seconds": 2.0, "distill_seconds": 120.0, "result": result(
        "distilled (IS-DPO)", "distilled", 0.3, 41, name="distilled-is-dpo", kl=0.0101).to_dict()})
    report = loop.report().read_text()
    assert "| mean reward [95% CI] | distinct-2 | tokens/prompt | wall s | KL to base |" in report
    assert "| distilled (APA) |" in report and "| 0.0312 |" in report and "| distilled (IS-DPO) |" in report
    assert "- distilled (APA): +0.500 at 40 tokens/prompt recovers 75% of IRO-1's gain over base" in report
    assert "distinct-2 0.760 (-5% vs base 0.800); KL to base 0.0312; distillation 95 s." in report
    assert "recovers 25% of IRO-1's gain" in report
    assert (loop.run_dir / "reward_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_marks_each_distilled_policy(tmp_path, monkeypatch):
    calls = []
    from matplotlib.axes import Axes

    original = Axes.errorbar

    def spy(self, x, y, *args, **kw):
        calls.append((kw.get("label"), kw.get("marker"), list(x)))
        return original(self, x, y, *args, **kw)

    monkeypatch.setattr(Axes, "errorbar", spy)
    plot_reward_vs_tokens([result("base (N=1)", "base", 0.2, 40), result("distilled (APA)", "distilled", 0.5, 40),
                           result("distilled (IS-DPO)", "distilled", 0.4, 40)], tmp_path / "p.png")
    marks = {label: (marker, x) for label, marker, x in calls}
    assert marks["distilled (APA), 1x cost"] == ("D", [40]) and marks["distilled (IS-DPO), 1x cost"][0] == "P"


def recording_rollout(asked):
    """`run_rollout` as the server would answer it (one record per prompt and sample), recording what was asked."""
    from trainer.rollout_records import RolloutStats

    def fake_rollout(prompts, path, config):
        prompts = list(prompts)
        asked.append((path, config))
        with path.open("a") as f:
            for item in prompts:
                for j in range(config.samples_per_prompt):
                    f.write(json.dumps({"id": f"{item.id}:{j}", "prompt_id": item.id, "response": "good",
                                        "prompt_token_ids": [1], "response_token_ids": [5], "reward": None}) + "\n")
        n = len(prompts) * config.samples_per_prompt
        return RolloutStats(total=n, skipped=0, written=n, completion_tokens=16 * n)

    return fake_rollout


def test_distill_from_a_search_collects_the_final_policys_own_rollouts(tmp_path, monkeypatch):
    import trainer.loop

    asked = []
    monkeypatch.setattr(trainer.loop, "run_rollout", recording_rollout(asked))
    loop = make_loop(tmp_path, distill_from={"mode": "pf", "k": 16, "budget_tokens": 512})
    assert loop.distiller().data_path() == loop.run_dir / "distill-data" / "labelled.jsonl"
    assert make_loop(tmp_path / "plain").distiller().data_path().parts[-2:] == ("it1", "labelled.jsonl")
    loop.state.set_version(1, 3)
    info = loop.distill_rollout()
    path, config = asked[0]
    assert path == loop.run_dir / "distill-data" / "rollouts.jsonl"
    # the final chain, every field of the search pinned except those pf has no use for (the server refuses w)
    assert config.guidance() == {"value": "rev@3", "mode": "pf", "k": 16, "l": 8, "budget_tokens": 512}
    assert config.seed == 2 and config.samples_per_prompt == loop.config.samples_per_prompt  # iteration T+1's seeds
    assert info["policy"] == "rev@3" and info["source"]["mode"] == "pf"
    loop.state.finish("distill-data/rollout", info)
    labelled = loop._label(loop.run_dir / "distill-data")
    loop.state.finish("distill-data/reward", labelled)
    assert labelled["records"] == loop.config.n_train_prompts * loop.config.samples_per_prompt
    assert (loop.run_dir / "distill-data" / "labelled.jsonl").exists()

    loop._forget_other_distill_data()  # the same search: kept
    assert loop.state.stage("distill-data/reward") is not None
    loop.state.set_version(2, 4)
    loop.config = loop.config.model_copy(update={"iterations": 2})  # resumed with one more iteration
    loop._forget_other_distill_data()  # rollouts of V_1..V_3 are not the final policy's any more
    assert loop.state.stage("distill-data/rollout") is None
    loop.config = loop.config.model_copy(update={"iterations": 1})
    loop.state.data["stages"].update({"distill-data/rollout": info, "distill-data/reward": labelled})
    loop.config = loop.config.model_copy(update={"distill_from": loop.config.distill_from.model_copy(update={"k": 8})})
    loop._forget_other_distill_data()  # another search: collected again, not resumed onto the old file
    assert loop.state.stage("distill-data/rollout") is None and loop.state.stage("distill-data/reward") is None
    assert not (loop.run_dir / "distill-data" / "rollouts.jsonl").exists()


def test_distill_from_base_collects_plain_samples_seeded_as_iteration_one(tmp_path, monkeypatch):
    import trainer.loop

    asked = []
    monkeypatch.setattr(trainer.loop, "run_rollout", recording_rollout(asked))
    loop = make_loop(tmp_path, distill_from="base")
    loop.state.set_version(1, 3)
    info = loop.distill_rollout()
    _, config = asked[0]
    assert config.guidance() is None and config.value is None  # plain sampling from the base model
    first = loop._template(samples_per_prompt=loop.config.samples_per_prompt, seed=loop.config.seed * 1000 + 1)
    assert config == first  # iteration 1's job: a run from scratch gets the very same samples
    assert info["policy"] == "base" and info["source"] == "base"
    assert loop.distiller().data_path() == loop.run_dir / "distill-data" / "labelled.jsonl"


def test_distill_from_may_change_until_the_first_distillation(tmp_path):
    state = RunState.open(tmp_path / "run", LoopConfig.from_preset("smoke", distill=["apa"]))
    state.finish("distill-data/rollout", {"source": "last"})
    pf = LoopConfig.from_preset("smoke", distill=["apa"], distill_from={"mode": "pf", "k": 8})
    again = RunState.open(tmp_path / "run", pf)
    assert again.data["config"]["distill_from"]["mode"] == "pf"
    again.finish("distill/apa/train", {"policy": "x"})
    with pytest.raises(LoopError, match="distill_from"):
        RunState.open(tmp_path / "run", LoopConfig.from_preset("smoke", distill=["apa"]))
    with pytest.raises(ValueError, match="distill_from"):
        LoopConfig.from_preset("smoke", distill_from="bse")
