"""The IRO loop against a running server: T iterations of rollout -> reward -> train V_t ->
publish (the server hot-swaps) -> evaluate, then baselines and a report.

    iteration t:  rollout   training prompts answered by pi_{t-1}: the base model at t = 1,
                            CBS over the chain V_1..V_{t-1} after that
                  reward    each response labelled with the task's reward
                  train     V_t regresses the reward at every response token, from V_{t-1}
                  publish   into the server's registry (chain V_1..V_t); wait until it serves
                  eval      held-out prompts answered by IRO-t (CBS over V_1..V_t)
    then:         baselines base (N = 1) and Best-of-N ranked by the final chain
    distil data:  (with `distill` and `distill_from` base or a search) the training prompts answered
                  afresh by the base model or by the final policy (V_1..V_T with that search) into
                  distill-data/, labelled
    distil:       (with `distill`, per method) train a LoRA policy on those rollouts, or on iteration
                  T's guided rollouts with `distill_from` last, the default (`iro distill`: APA
                  advantages from the final chain V_1..V_T; IS-DPO pairs by reward), publish it
                  into the policy registry the server watches, wait until it
                  serves, evaluate it with plain sampling (N = 1) through its model name
                  report    report.md, reward_vs_tokens.png, reward_per_iteration.png

Every stage is recorded in `run_dir/state.json` when it finishes; a re-run skips finished
stages (and the rollout stage resumes a half-written file), so a killed loop is simply started
again. Versions are pinned (`name@N`) in every request, so results do not depend on timing.

    config = LoopConfig.from_preset("smoke", iterations=2)
    report = IroLoop(config, run_dir="runs/demo", values_dir="~/.cache/iro/values",
                     server="http://127.0.0.1:8000").run()

Distillation needs a server started with `iro serve --policies-dir DIR` on the same DIR as the
loop's `policies_dir`: the loop checks that (GET /v1/policies) before any work.

With `continue_chain` (`iro loop --continue`), a new run starts from the value the registry already
serves under the name (CURRENT, chain V_1..V_N, made by any run or by hand): those N iterations are
adopted, IRO-N is evaluated on this run's held-out prompts (the "before"), and the run's iterations
are N+1..N+T: rollouts guided by V_1..V_N, V_{N+1} trained from V_N. This is online IRO from served
traffic (`--from-stored --continue`): the value that served the stored requests is the one improved.

Every evaluation records which held-out prompts it ran on; when a resumed run's held-out prompts
changed (a run resumed with `--from-stored`), its earlier evaluations are run again on the new ones,
so one report never mixes prompt sets.

The loop in parts: its config (`trainer.loop_config`), run state (`trainer.loop_state`), the value
iterations and the orchestration (here), the distillation stages (`trainer.loop_distill`) and the
report from plain data (`trainer.loop_report`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.eval_results import MethodResult
from trainer.evaluate import BASE, Method, best_of_n, evaluate_method
from trainer.loop_config import LoopConfig
from trainer.loop_distill import DISTILL_DATA, DISTILL_DATA_STAGES, DistillStages, policy_name
from trainer.loop_report import IterationRow, ReportData, render_report
from trainer.loop_state import LoopError, RunState, ServerLink
from trainer.rollout import DEFAULT_SERVER, RolloutConfig, run_rollout
from trainer.tasks import Task

log = logging.getLogger(__name__)


class IroLoop:
    """Runs (or resumes) the loop described by `config` against the server at `server`.

    `values_dir` must be the registry the server watches: V_t is published there and the loop
    waits (up to `publish_timeout`) until `GET /v1/values` shows the server serving it. `task` is
    `config.task` already loaded (`trainer.tasks.load_task`), so a caller can check it first.
    `policies_dir` (with `config.distill`; default `IRO_POLICIES_DIR` / `$IRO_HOME/policies`) must
    likewise be the policy registry the server serves (`iro serve --policies-dir`).
    """

    def __init__(self, config: LoopConfig, *, run_dir: str | Path, values_dir: str | Path,
                 server: str = DEFAULT_SERVER, api_key: str | None = None, admin_key: str | None = None,
                 model: str | None = None, task: Task | None = None, policies_dir: str | Path | None = None,
                 continue_chain: bool = False):
        from trainer.tasks import load_task
        from valuefn.registry import Registry, validate_name

        self.config = config
        self.task = task if task is not None else load_task(config.task)
        self.name = validate_name(config.name or self.task.name)
        self.search = self.task.search.resolve(config.search)  # IRO-t's, at evaluation: the task's, options over it
        self.run_dir = Path(run_dir).expanduser()
        self.registry = Registry(values_dir)
        from registry.policies import PolicyRegistry, default_policies_dir

        self.policies = PolicyRegistry(Path(policies_dir).expanduser() if policies_dir else default_policies_dir())
        for method in config.distill:
            validate_name(policy_name(config, self.name, method), "policy")
        self.server, self.model = ServerLink(server, api_key, admin_key), model
        self.max_tokens = config.max_tokens or self.task.max_tokens
        self.temperature = config.temperature if config.temperature is not None else self.task.temperature
        self.continue_chain = continue_chain
        self.state: RunState | None = None
        self._distiller: DistillStages | None = None

    # ------------------------------------------------------------------ driver
    def run(self) -> Path:
        """All iterations, the baselines and the report; returns the report's path."""
        self.state = RunState.open(self.run_dir, self.config)
        if self.continue_chain:
            self._adopt_chain()
        self._check_registry()
        self._forget_other_evaluations()
        if any(self.state.stage(f"distill/{m}/eval") is None for m in self.config.distill):
            self.distiller().check_server()
        if self.adopted:  # the "before": the chain the run continues, on this run's held-out prompts
            n = len(self.adopted)
            self._stage(f"it{n}/serve", lambda: self.serve(n))
            self._stage(f"it{n}/eval", lambda: self.evaluate(n))
        for t in self.iterations:
            self._stage(f"it{t}/rollout", lambda: self.rollout(t))
            self._stage(f"it{t}/reward", lambda: self.reward(t))
            self._stage(f"it{t}/train", lambda: self.train(t))
            self._stage(f"it{t}/serve", lambda: self.serve(t))
            self._stage(f"it{t}/eval", lambda: self.evaluate(t))
        final = self.state.version(self.last)
        self._stage(f"baselines/v{final}", lambda: self.baselines(final))
        distiller = self.distiller()
        if self.config.distill and self.config.distill_from != "last":
            self._forget_other_distill_data()
            rollout, reward = DISTILL_DATA_STAGES
            self._stage(rollout, self.distill_rollout)
            self._stage(reward, lambda: self._label(self.run_dir / DISTILL_DATA))
        for method in self.config.distill:
            self._stage(f"distill/{method}/train", lambda: distiller.train(method))
            self._stage(f"distill/{method}/serve", lambda: distiller.serve(method))
            self._stage(f"distill/{method}/eval", lambda: distiller.evaluate(method))
        return self.report()

    @property
    def adopted(self) -> list[int]:
        """Versions of the chain this run continues (`continue_chain`), as V_1..V_N; [] for a run from scratch."""
        return self.state.adopted

    @property
    def last(self) -> int:
        """The run's last iteration (its final chain is V_1..V_last)."""
        return self.state.last_iteration(self.config.iterations)

    @property
    def iterations(self) -> range:
        """This run's own iterations t: 1..T, or N+1..N+T when it continues a chain of N."""
        return range(len(self.adopted) + 1, self.last + 1)

    def _adopt_chain(self) -> None:
        """Record the registry's CURRENT chain of the name as iterations 1..N (once, when the run starts)."""
        if "adopted" in self.state.data:
            return
        if self.state.data["versions"]:
            raise LoopError(f"{self.run_dir} already ran its own iterations: --continue starts a new run "
                            "(use a new --run-dir)")
        current = self.registry.current(self.name)
        if current is None:
            raise LoopError(f"--continue: value {self.name!r} is not in {self.registry.root}: nothing to continue "
                            "(give the name of a served value with --name)")
        chain = [link.version for link in self.registry.manifest(self.name, current).chain]
        self.state.data["adopted"] = chain
        self.state.data["adopted_from"] = f"{self.name}@{current}"
        for t, version in enumerate(chain, start=1):
            self.state.data["versions"][str(t)] = version
        self.state.save()
        log.info("continuing %s@%d (chain %s): this run's iterations are %d..%d", self.name, current, chain,
                 self.iterations.start, self.last)

    def _eval_set(self) -> str:
        """Identity of the held-out prompts the evaluations run on (a hash of their messages)."""
        import hashlib
        import json

        items = [item.messages or item.prompt for item in self._eval_prompts()]
        return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _forget_other_evaluations(self) -> None:
        """Drop finished evaluations (IRO-t, baselines) that ran on other held-out prompts than this run's
        now, so they run again; a state written before evaluations recorded their prompts keeps its own."""
        current = self._eval_set()
        stale = [key for key, info in self.state.data["stages"].items()
                 if ((key.startswith("it") and key.endswith("/eval")) or key.startswith("baselines/"))
                 and info.get("eval_set", current) != current]
        for key in stale:
            log.info("stage %s ran on other held-out prompts (a resumed run with other prompts): running it again",
                     key)
            del self.state.data["stages"][key]
        if stale:
            self.state.save()

    def _forget_other_distill_data(self) -> None:
        """Drop the distillation rollouts (stages and files) when they came from another source than
        `distill_from` now, or from another final chain (a run resumed with more iterations), so they
        are collected again rather than resumed."""
        done = self.state.stage(DISTILL_DATA_STAGES[0])
        wanted = self.config.distill_source()
        policy = "base" if wanted == "base" else self._value(self.last)
        if done is None or (done.get("source"), done.get("policy")) == (wanted, policy):
            return
        log.info("the distillation rollouts came from %s (%s), not %s (%s): collecting them again",
                 done.get("source"), done.get("policy"), wanted, policy)
        for key in DISTILL_DATA_STAGES:
            self.state.data["stages"].pop(key, None)
        for name in ("rollouts.jsonl", "labelled.jsonl"):
            (self.run_dir / DISTILL_DATA / name).unlink(missing_ok=True)
        self.state.save()

    def distiller(self) -> DistillStages:
        """The distillation stages of this run (once the state is open)."""
        if self._distiller is None or self._distiller.state is not self.state:
            self._distiller = DistillStages(
                self.config, self.state, name=self.name, reward=self.task.reward, run_dir=self.run_dir,
                registry=self.registry, policies=self.policies, server=self.server, model=self.model,
                evaluate=self.evaluate_heldout)
        return self._distiller

    def _check_registry(self) -> None:
        """Fail before any work when the value name is taken by something other than this run."""
        recorded = set(self.state.data["versions"].values())
        current = self.registry.current(self.name)
        if current is None or current in recorded:
            return
        training = self.registry.manifest(self.name, current).training
        if training.get("loop_run") != self.state.run_id:
            raise LoopError(f"value {self.name!r} already exists in {self.registry.root} (CURRENT v{current}) and "
                            "was not made by this run: choose another --name, or remove it from the registry")

    def _stage(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        assert self.state is not None
        done = self.state.stage(key)
        if done is not None:
            log.info("stage %s: done already (%.1f s), skipped", key, done.get("seconds", 0.0))
            return done
        log.info("stage %s ...", key)
        start = time.perf_counter()
        try:
            info = fn()
        except LoopError as exc:
            raise LoopError(str(exc), stage=key) from exc
        info = {"seconds": round(time.perf_counter() - start, 2), "finished_at": time.time(), **info}
        self.state.finish(key, info)
        log.info("stage %s: done in %.1f s", key, info["seconds"])
        return info

    def _dir(self, t: int) -> Path:
        d = self.run_dir / f"it{t}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _value(self, t: int) -> str:
        version = self.state.version(t)
        if version is None:
            raise LoopError(f"iteration {t} has no published version in {self.state.path}")
        return f"{self.name}@{version}"

    def _template(self, **kw: Any) -> RolloutConfig:
        return RolloutConfig(server=self.server.url, api_key=self.server.api_key, concurrency=self.config.concurrency,
                             temperature=self.temperature, max_tokens=self.max_tokens, progress=self.config.progress,
                             **kw)

    # ------------------------------------------------------------------ stages
    def rollout(self, t: int) -> dict[str, Any]:
        """Training prompts answered by pi_{t-1} into `it{t}/rollouts.jsonl` (resumable)."""
        guided = {} if t == 1 else dict(value=self._value(t - 1), search=self.config.rollout_search)
        return self._collect(self._dir(t), guided, seed=self.config.seed * 1000 + t)

    def distill_rollout(self) -> dict[str, Any]:
        """Training prompts answered for distillation (`distill_from`) into `distill-data/rollouts.jsonl`
        (resumable): by the base model, seeded as iteration 1's rollouts (a run from scratch gets the same
        ones), or by the final policy pi_T (V_1..V_T with the search), seeded as iteration T+1's."""
        source, seed = self.config.distill_from, self.config.seed * 1000
        d = self.run_dir / DISTILL_DATA
        d.mkdir(parents=True, exist_ok=True)
        if source == "base":
            info = self._collect(d, {}, seed=seed + 1)
        else:
            info = self._collect(d, dict(value=self._value(self.last), search=source), seed=seed + self.last + 1)
        return {**info, "source": self.config.distill_source()}

    def _collect(self, d: Path, guided: dict[str, Any], *, seed: int) -> dict[str, Any]:
        """The training prompts, `samples_per_prompt` each, answered plainly or `guided` into `d/rollouts.jsonl`."""
        c = self.config
        config = self._template(samples_per_prompt=c.samples_per_prompt, seed=seed, **guided)
        prompts = self.task.items("train", c.n_train_prompts)
        stats = run_rollout(prompts, d / "rollouts.jsonl", config)
        if not stats.complete:
            raise LoopError(f"{stats.failed} of {stats.total} rollouts failed (first: {stats.errors[:1]}); "
                            "run the loop again to resume")
        return {"policy": guided.get("value") or "base", "records": stats.total, "new_records": stats.written,
                "completion_tokens": stats.completion_tokens, "rollout_seconds": round(stats.seconds, 2)}

    def reward(self, t: int) -> dict[str, Any]:
        """`it{t}/labelled.jsonl`: the rollouts with the task's reward."""
        return self._label(self._dir(t))

    def _label(self, d: Path) -> dict[str, Any]:
        """`d/labelled.jsonl`: `d/rollouts.jsonl` with the task's reward."""
        from trainer.rewards import label_records, parse_reward
        from trainer.rollout import read_records, write_records

        records = label_records(read_records(d / "rollouts.jsonl"), parse_reward(self.task.reward))
        write_records(d / "labelled.jsonl", records)
        rewards = [r["reward"] for r in records]
        return {"records": len(records), "mean_reward": sum(rewards) / len(rewards) if rewards else None}

    def train(self, t: int) -> dict[str, Any]:
        """Train V_t from V_{t-1} on `it{t}/labelled.jsonl` and publish it (chain V_1..V_t)."""
        from common.model_store import resolve_model
        from trainer.value_trainer import ValueTrainer, examples_from_records, read_rollouts, rollout_policies

        expected = self.state.version(t - 1) if t > 1 else None
        current = self.registry.current(self.name)
        if current is not None:  # published by this run before a kill, but not recorded yet?
            training = self.registry.manifest(self.name, current).training
            if training.get("loop_run") == self.state.run_id and training.get("iteration") == t:
                log.info("iteration %d: adopting %s v%d, already published by this run", t, self.name, current)
                self.state.set_version(t, current)
                return self._train_info(current, training, adopted=True)
        if current != expected:
            raise LoopError(
                f"value {self.name!r} has CURRENT v{current} in {self.registry.root}, but iteration {t} must follow "
                f"{f'v{expected}' if expected else 'nothing'}: another run or writer uses this name "
                "(choose another --name, or remove it from the registry)")
        config = self.config.train_config(progress=self.config.progress)
        labelled = self._dir(t) / "labelled.jsonl"
        records = read_rollouts(labelled)
        examples, skipped = examples_from_records(records)
        if not examples:
            raise LoopError(f"no usable training examples in {labelled} (skipped: {skipped})")
        trainer = ValueTrainer(config, resolve_model(self.model), registry=self.registry, name=self.name)
        result = trainer.train(examples, data=str(labelled), extra={"loop_run": self.state.run_id, "iteration": t,
                                                                  "rollout_policies": rollout_policies(records)})
        version = trainer.publish(result, beta=self.config.beta)
        self.state.set_version(t, version)
        info = self._train_info(version, result.training, metrics=result.metrics, skipped=skipped)
        del trainer, result
        gc.collect()
        return info

    def _train_info(self, version: int, training: dict, *, metrics: dict | None = None, adopted: bool = False,
                    skipped: dict | None = None) -> dict[str, Any]:
        metrics = metrics if metrics is not None else self.registry.manifest(self.name, version).metrics
        after, before = metrics.get("eval") or {}, metrics.get("eval_before") or {}
        chain = [link.version for link in self.registry.manifest(self.name, version).chain]
        return {"version": version, "chain": chain,
                "init_from": training.get("init_from"), "steps": training.get("steps"),
                "examples": training.get("examples"), "train_seconds": training.get("seconds"),
                "heldout_mse_before": before.get("mse"), "heldout_mse": after.get("mse"),
                "spearman": after.get("spearman"), "pair_acc": after.get("pair_acc"),
                "train_loss_last": metrics.get("train_loss_last"), "adopted": adopted, "skipped": skipped or {}}

    def serve(self, t: int) -> dict[str, Any]:
        """Wait until the server serves V_t (its watcher picks CURRENT up; nudged once if slow)."""
        from clients.errors import APIStatusError

        version = self.state.version(t)
        start = time.monotonic()
        deadline = start + self.config.publish_timeout
        nudged = False
        status = None
        with self.server.client() as client:
            while time.monotonic() < deadline:
                status = next((v for v in client.values().data if v.name == self.name), None)
                if status is not None:
                    if status.serving_version == version:
                        return {"version": version, "wait_seconds": round(time.monotonic() - start, 2)}
                    refused = next((r for r in status.refused if r.version == version), None)
                    if refused is not None:
                        raise LoopError(f"the server refused {self.name} v{version}: {refused.reason}")
                if not nudged and time.monotonic() - start > min(15.0, self.config.publish_timeout / 3):
                    nudged = True  # the watcher may be off: ask for CURRENT explicitly
                    try:
                        client.load_value(self.name)
                    except APIStatusError as exc:
                        log.warning("asking the server to load %s failed: %s", self.name, exc)
                time.sleep(0.25)  # polling the server's state against a deadline
        where = ("the server does not know this value at all: is --values-dir the server's values dir "
                 f"({self.registry.root})?" if status is None else f"it serves v{status.serving_version}")
        raise LoopError(f"{self.name} v{version} not served after {self.config.publish_timeout:.0f} s; {where}")

    def _eval_prompts(self):
        return self.task.items("eval", self.config.n_eval_prompts)

    def evaluate_heldout(self, method: Method, **template: Any) -> MethodResult:
        """`method` on the held-out prompts, with the evaluation's seeds (`template`: more rollout options)."""
        return evaluate_method(method, self._eval_prompts(), self.run_dir / "eval", reward=self.task.reward,
                               template=self._template(seed=self.config.seed * 1000 + 999, **template))

    def evaluate(self, t: int) -> dict[str, Any]:
        """IRO-t: the evaluation search (CBS by default) over V_1..V_t on the held-out prompts."""
        method = Method(f"iro-{t}", f"IRO-{t}", "cbs", self._value(t), search=self.search)
        return {"result": self.evaluate_heldout(method).to_dict(), "eval_set": self._eval_set()}

    def baselines(self, final: int) -> dict[str, Any]:
        """base (N=1) and Best-of-N (ranked by the final chain, and by the reward), on the held-out prompts."""
        c = self.config
        prompts, template = self._eval_prompts(), self._template(seed=c.seed * 1000 + 999)
        results = [self.evaluate_heldout(BASE)]
        results += best_of_n(prompts, c.bon, self.run_dir / "eval", reward=self.task.reward, template=template,
                             value=f"{self.name}@{final}", oracle=c.oracle)
        return {"value": f"{self.name}@{final}", "results": [r.to_dict() for r in results],
                "eval_set": self._eval_set()}

    # ------------------------------------------------------------------ report
    def results(self) -> tuple[list[MethodResult], list[MethodResult]]:
        """(IRO-t for t = 1..T, baselines) from the state."""
        iro = [MethodResult.from_dict(self.state.stage(f"it{t}/eval")["result"])
               for t in self._reported() if self.state.stage(f"it{t}/eval")]
        final = self.state.version(self.last)
        base = self.state.stage(f"baselines/v{final}") or {"results": []}
        return iro, [MethodResult.from_dict(r) for r in base["results"]]

    def report_data(self) -> ReportData:
        """What the report says, gathered from the state."""
        state, c = self.state, self.config
        iro, baselines = self.results()
        distilled, distill_seconds = self.distiller().results()
        rows = []
        for t in self._reported():
            train = state.stage(f"it{t}/train") or {}
            seconds = {s: (state.stage(f"it{t}/{s}") or {}).get("seconds")
                       for s in ("rollout", "reward", "train", "serve", "eval")}
            rows.append(IterationRow(
                t=t, value=f"{self.name}@{state.version(t)}",
                chain=list(train.get("chain") or (self.adopted[:t] if t <= len(self.adopted) else [])),
                result=next((r for r in iro if r.label == f"IRO-{t}"), None),
                rollout_reward=(state.stage(f"it{t}/reward") or {}).get("mean_reward"),
                heldout_mse=train.get("heldout_mse"), spearman=train.get("spearman"), seconds=seconds))
        return ReportData(
            config=c, value_name=self.name, task=self.task.name, task_source=self.task.source, reward=self.task.reward,
            server=self.server.url, registry=str(self.registry.root), run_id=state.run_id, max_tokens=self.max_tokens,
            temperature=self.temperature, eval_search=self.search,
            final_value=f"{self.name}@{state.version(self.last)}", total_seconds=state.stage_seconds(), rows=rows,
            iro=iro, baselines=baselines, distilled=distilled, distill_seconds=distill_seconds,
            n_train_prompts=len(self.task.items("train", c.n_train_prompts)),
            n_eval_prompts=len(self._eval_prompts()), iterations=self.iterations,
            continued_from=state.data.get("adopted_from"))

    def _reported(self) -> range:
        """Iterations the report shows: the run's own, after the adopted chain's last (its "before")."""
        return range(max(1, len(self.adopted)), self.last + 1)

    def report(self) -> Path:
        """Write `report.md` and the two plots from the state; returns the report's path."""
        from trainer.plots import plot_iterations, plot_reward_vs_tokens

        data = self.report_data()
        plot_reward_vs_tokens(data.baselines + data.distilled + data.iro, self.run_dir / "reward_vs_tokens.png",
                              title=f"{self.task.name}: reward vs tokens generated")
        plot_iterations(data.iro, data.baselines, self.run_dir / "reward_per_iteration.png",
                        title=f"{self.task.name}: held-out reward per IRO iteration")
        path = self.run_dir / "report.md"
        path.write_text(render_report(data))
        return path


__all__ = ["IroLoop", "LoopConfig", "LoopError", "RunState"]
