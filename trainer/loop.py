"""The IRO loop against a running server: T iterations of rollout -> reward -> train V_t ->
publish (the server hot-swaps) -> evaluate, then baselines and a report.

    iteration t:  rollout   training prompts answered by pi_{t-1}: the base model at t = 1,
                            CBS over the chain V_1..V_{t-1} after that
                  reward    each response labelled with the task's reward
                  train     V_t regresses the reward at every response token, from V_{t-1}
                  publish   into the server's registry (chain V_1..V_t); wait until it serves
                  eval      held-out prompts answered by IRO-t (CBS over V_1..V_t)
    then:         baselines base (N = 1) and Best-of-N ranked by the final chain
    distil:       (with `distill`, per method) train a LoRA policy on iteration T's guided rollouts
                  (`iro distill`: APA advantages from the final chain V_1..V_T; IS-DPO pairs by
                  reward), publish it into the policy registry the server watches, wait until it
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
"""

from __future__ import annotations

import gc
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.evaluate import BASE, Method, MethodResult, best_of_n, evaluate_method
from trainer.loop_report import closing_note, render_report, verdict
from trainer.options import load_preset, merge, nest, short_error
from trainer.rollout import DEFAULT_SERVER, RolloutConfig, run_rollout, write_atomic
from trainer.tasks import Task

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).parent / "presets" / "loop"
STATE_FORMAT = 1


class LoopError(RuntimeError):
    """A stage that cannot go on (with what to do about it in the message)."""

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(f"{stage}: {message}" if stage else message)
        self.stage = stage


class LoopConfig(BaseModel):
    """Sizes and settings of one loop run (connection settings are `IroLoop` arguments)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    task: str = "review-sentiment"
    """A built-in task's name, a task file, or a folder with task.yaml (see trainer.tasks)."""
    iterations: int = Field(3, ge=1)
    name: str | None = None
    """Value name in the registry (default: the task's name)."""
    # --- rollouts (training data)
    n_train_prompts: int = Field(64, ge=1)
    samples_per_prompt: int = Field(2, ge=1)
    rollout_w: int = Field(4, ge=1)
    """Beam width of the guided rollouts of iterations t > 1."""
    rollout_k: int = Field(4, ge=1)
    rollout_l: int = Field(8, ge=1)
    # --- evaluation
    n_eval_prompts: int = Field(32, ge=1)
    bon: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    """N of the Best-of-N baselines (1 is plain base sampling)."""
    oracle: bool = True
    """Also Best-of-N ranked by the reward itself (the headroom a value could reach)."""
    w: int | None = Field(None, ge=1)
    """CBS of IRO-t at evaluation: beams, successors per beam, chunk length (default: the task's
    `search`, whose own default is the reference's 4, 4, 8)."""
    k: int | None = Field(None, ge=1)
    l: int | None = Field(None, ge=1)
    # --- sampling (all stages)
    max_tokens: int | None = Field(None, ge=1)
    """Response length (default: the task's)."""
    temperature: float | None = Field(None, ge=0)
    """Sampling temperature (default: the task's)."""
    concurrency: int = Field(16, ge=1)
    seed: int = 0
    # --- value training
    train_preset: str = "full"
    """Value-training preset (trainer/presets/*.yaml) or a YAML path."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the value-training preset (ValueTrainConfig options, `model:` nested)."""
    beta: float = Field(1.0, gt=0)
    publish_timeout: float = Field(180.0, gt=0)
    """Seconds to wait for the server to serve a new version."""
    # --- distillation (after the last iteration)
    distill: list[Literal["apa", "is-dpo", "is-ipo"]] = Field(default_factory=list)
    """Distil the final guided policy into a LoRA policy per method (`apa`, `is-dpo`, `is-ipo`;
    a comma list is fine); empty: no distillation."""
    distill_preset: str = "full"
    """Distillation preset (trainer/presets/distill/*.yaml) or a YAML path."""
    distill_options: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the distillation preset (DistillConfig options); a method's name as the key
    holds overrides for that method alone (`distill_options.apa.lam=0.025`)."""
    progress: bool = True

    @field_validator("distill", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else list(value)
        methods = [m.strip() for item in items for m in str(item).split(",") if m.strip()]
        return list(dict.fromkeys(methods))  # once each, in the order given

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown loop option {unknown[0]!r}; known: {', '.join(sorted(cls.model_fields))} "
                                 "(value-training options as train.KEY)")
        return data

    @model_validator(mode="after")
    def _train_options_are_known(self) -> "LoopConfig":
        self.train_config()  # refuses a bad train.KEY now rather than after an hour of rollouts
        for method in self.distill:
            self.distill_config(method)
        return self

    def distill_config(self, method: str, **overrides: Any):
        """The distillation config of `method`: `distill_preset` with `distill_options` over it; no
        sampling from the trainer (the loop evaluates through the server), unless an option asks."""
        from trainer.distill_config import METHODS, DistillConfig

        shared = {k: v for k, v in self.distill_options.items() if k not in METHODS}
        own = self.distill_options.get(method) or {}
        if not isinstance(own, dict):
            raise ValueError(f"distill_options.{method} must hold options of that method (e.g. "
                             f"distill_options.{method}.lr=1e-4), not {own!r}")
        return DistillConfig.from_preset(self.distill_preset,
                                         **{"eval_prompts": 0, **overrides, **flatten(shared), **flatten(own),
                                            "method": method})

    def train_config(self, **overrides: Any):
        """The value-training config of every iteration: `train_preset` with `train` over it."""
        from trainer.value_config import ValueTrainConfig

        return ValueTrainConfig.from_preset(self.train_preset, **{**overrides, **flatten(self.train)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopConfig:
        """Build from a mapping; dotted keys reach into sections (`train.lr`, `train.model.lora_r`),
        strings are read as YAML scalars (so `--set bon=[1,4]` and `--set iterations=2` work)."""
        try:
            return cls.model_validate(nest(values, TEXT_OPTIONS))
        except ValidationError as exc:
            raise short_error(exc, "loop options") from None

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> LoopConfig:
        """A preset by name (`smoke`, `full`; trainer/presets/loop/) or a YAML path, plus overrides.

        A distillation option given for all methods (`distill_options.lr=...`) replaces the preset's
        per-method value of it (`distill_options.apa.lr`): what the user sent wins."""
        from trainer.distill_config import METHODS

        base, extra = nest(load_preset(preset, PRESETS_DIR, "loop preset")), nest(overrides, TEXT_OPTIONS)
        shared = {k for k in (extra.get("distill_options") or {}) if k not in METHODS}
        for method, options in (base.get("distill_options") or {}).items():
            if method in METHODS and isinstance(options, dict):
                base["distill_options"][method] = {k: v for k, v in options.items() if k not in shared}
        return cls.from_dict(merge(base, extra))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


TEXT_OPTIONS = frozenset({"task", "name", "train_preset", "distill_preset"})
"""Loop options taken as text from the command line (a value named `null` or `yes` is a name)."""


def flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as dotted keys (the inverse of trainer.options.nest)."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


RESUMABLE_OPTIONS = frozenset({"iterations", "progress", "publish_timeout", "concurrency", "distill"})
"""Options a run may be resumed with changed (more iterations, distillation added afterwards)."""
DISTILL_OPTIONS = frozenset({"distill_preset", "distill_options"})
"""Options a run may be resumed with changed until its first distillation stage has finished."""

DISTILL_LABELS = {"apa": "APA", "is-dpo": "IS-DPO", "is-ipo": "IS-IPO"}


# --------------------------------------------------------------------------- state
class RunState:
    """`state.json` of a run directory: the config, and each finished stage with its results."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def open(cls, run_dir: Path, config: LoopConfig) -> RunState:
        path = run_dir / "state.json"
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("format") != STATE_FORMAT:
                raise LoopError(f"{path}: unknown state format {data.get('format')!r}")
            old = data.get("config", {})
            defaults = LoopConfig.model_fields
            resumable = RESUMABLE_OPTIONS
            if not any(key.startswith("distill/") for key in data.get("stages", {})):
                resumable = resumable | DISTILL_OPTIONS
            changed = {k: (old.get(k), v) for k, v in config.to_dict().items()
                       if k not in resumable and old.get(k, defaults[k].get_default(call_default_factory=True)) != v}
            if changed:
                raise LoopError(f"{run_dir} was started with other settings {changed} (old, new); resume it with the "
                                "same preset and options, or use a new --run-dir")
            data["config"] = config.to_dict()
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            data = {"format": STATE_FORMAT, "run_id": uuid.uuid4().hex, "created_at": time.time(),
                    "config": config.to_dict(), "stages": {}, "versions": {}}
        state = cls(path, data)
        state.save()
        return state

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    def stage(self, key: str) -> dict[str, Any] | None:
        return self.data["stages"].get(key)

    def finish(self, key: str, info: dict[str, Any]) -> None:
        self.data["stages"][key] = info
        self.save()

    def version(self, t: int) -> int | None:
        return self.data["versions"].get(str(t))

    def set_version(self, t: int, version: int) -> None:
        self.data["versions"][str(t)] = version
        self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2))


# --------------------------------------------------------------------------- the loop
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
                 model: str | None = None, task: Task | None = None, policies_dir: str | Path | None = None):
        from trainer.tasks import load_task
        from valuefn.registry import Registry, validate_name

        self.config = config
        self.task = task if task is not None else load_task(config.task)
        self.name = validate_name(config.name or self.task.name)
        search = self.task.search
        self.search = (config.w or search.w, config.k or search.k, config.l or search.l)
        self.run_dir = Path(run_dir).expanduser()
        self.registry = Registry(values_dir)
        from registry.policies import PolicyRegistry, default_policies_dir

        self.policies = PolicyRegistry(Path(policies_dir).expanduser() if policies_dir else default_policies_dir())
        for method in config.distill:
            validate_name(self.policy_name(method), "policy")
        self.server, self.api_key, self.admin_key, self.model = server, api_key, admin_key, model
        self.max_tokens = config.max_tokens or self.task.max_tokens
        self.temperature = config.temperature if config.temperature is not None else self.task.temperature
        self.state: RunState | None = None

    # ------------------------------------------------------------------ driver
    def run(self) -> Path:
        """All iterations, the baselines and the report; returns the report's path."""
        self.state = RunState.open(self.run_dir, self.config)
        self._check_registry()
        if any(self.state.stage(f"distill/{m}/eval") is None for m in self.config.distill):
            self.check_policy_server()
        for t in range(1, self.config.iterations + 1):
            self._stage(f"it{t}/rollout", lambda: self.rollout(t))
            self._stage(f"it{t}/reward", lambda: self.reward(t))
            self._stage(f"it{t}/train", lambda: self.train(t))
            self._stage(f"it{t}/serve", lambda: self.serve(t))
            self._stage(f"it{t}/eval", lambda: self.evaluate(t))
        final = self.state.version(self.config.iterations)
        self._stage(f"baselines/v{final}", lambda: self.baselines(final))
        for method in self.config.distill:
            self._stage(f"distill/{method}/train", lambda: self.distill(method))
            self._stage(f"distill/{method}/serve", lambda: self.serve_policy(method))
            self._stage(f"distill/{method}/eval", lambda: self.evaluate_policy(method))
        return self.report()

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
        return RolloutConfig(server=self.server, api_key=self.api_key, concurrency=self.config.concurrency,
                             temperature=self.temperature, max_tokens=self.max_tokens, progress=self.config.progress,
                             **kw)

    # ------------------------------------------------------------------ stages
    def rollout(self, t: int) -> dict[str, Any]:
        """Training prompts answered by pi_{t-1} into `it{t}/rollouts.jsonl` (resumable)."""
        c = self.config
        guided = {} if t == 1 else dict(value=self._value(t - 1), mode="cbs", w=c.rollout_w, k=c.rollout_k,
                                        l=c.rollout_l)
        config = self._template(samples_per_prompt=c.samples_per_prompt, seed=c.seed * 1000 + t, **guided)
        prompts = self.task.items("train", c.n_train_prompts)
        stats = run_rollout(prompts, self._dir(t) / "rollouts.jsonl", config)
        if not stats.complete:
            raise LoopError(f"{stats.failed} of {stats.total} rollouts failed (first: {stats.errors[:1]}); "
                            "run the loop again to resume")
        return {"policy": guided.get("value") or "base", "records": stats.total, "new_records": stats.written,
                "completion_tokens": stats.completion_tokens, "rollout_seconds": round(stats.seconds, 2)}

    def reward(self, t: int) -> dict[str, Any]:
        """`it{t}/labelled.jsonl`: the rollouts with the task's reward."""
        from trainer.rewards import label_records, parse_reward
        from trainer.rollout import read_records, write_records

        d = self._dir(t)
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
        from clients import IroClient
        from clients.errors import APIStatusError

        version = self.state.version(t)
        start = time.monotonic()
        deadline = start + self.config.publish_timeout
        nudged = False
        status = None
        with IroClient(self.server, api_key=self.api_key, admin_key=self.admin_key) as client:
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

    def evaluate(self, t: int) -> dict[str, Any]:
        """IRO-t: CBS over V_1..V_t on the held-out prompts."""
        c = self.config
        w, k, l = self.search
        method = Method(f"iro-{t}", f"IRO-{t}", "cbs", self._value(t), w=w, k=k, l=l)
        result = evaluate_method(method, self._eval_prompts(), self.run_dir / "eval", reward=self.task.reward,
                                 template=self._template(seed=c.seed * 1000 + 999))
        return {"result": result.to_dict()}

    def baselines(self, final: int) -> dict[str, Any]:
        """base (N=1) and Best-of-N (ranked by the final chain, and by the reward), on the held-out prompts."""
        c = self.config
        prompts, template = self._eval_prompts(), self._template(seed=c.seed * 1000 + 999)
        results = [evaluate_method(BASE, prompts, self.run_dir / "eval", reward=self.task.reward, template=template)]
        results += best_of_n(prompts, c.bon, self.run_dir / "eval", reward=self.task.reward, template=template,
                             value=f"{self.name}@{final}", oracle=c.oracle)
        return {"value": f"{self.name}@{final}", "results": [r.to_dict() for r in results]}

    # ------------------------------------------------------------------ distillation
    def policy_name(self, method: str) -> str:
        """`<value name>-<method>`, the policy's name in the registry and its model name."""
        return f"{self.name}-{method}"

    def _admin_get(self, path: str):
        import httpx

        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        try:
            with httpx.Client(base_url=self.server, headers=headers, timeout=30) as http:
                return http.get(path)
        except httpx.HTTPError as exc:
            raise LoopError(f"cannot reach the server at {self.server}: {exc}") from exc

    def check_policy_server(self) -> None:
        """Fail before any work unless the server serves the policy registry the loop publishes to."""
        r = self._admin_get("/v1/policies")
        if r.status_code == 404:
            raise LoopError(f"--distill needs a server that serves policies: the server at {self.server} has no "
                            f"policy registry; restart it with `iro serve --policies-dir {self.policies.root}`")
        if r.status_code in (401, 403):
            raise LoopError(f"the server refused GET /v1/policies ({r.status_code}): pass its admin key (--admin-key "
                            "or IRO_ADMIN_KEY)")
        if r.status_code != 200:
            raise LoopError(f"GET /v1/policies answered {r.status_code}: {r.text[:300]}")
        served = r.json().get("registry")
        if served is not None and Path(served).resolve() != self.policies.root.resolve():
            raise LoopError(f"the server serves the policy registry {served}, but the loop publishes to "
                            f"{self.policies.root}: pass --policies-dir {served} (or restart the server with "
                            f"--policies-dir {self.policies.root})")
        for method in self.config.distill:
            name = self.policy_name(method)
            current = self.policies.current(name)
            if current is None or self.state.stage(f"distill/{method}/train"):
                continue
            if self.policies.manifest(name, current).training.get("loop_run") != self.state.run_id:
                raise LoopError(f"policy {name!r} already exists in {self.policies.root} (CURRENT v{current}) and was "
                                "not made by this run: choose another --name, or remove it from the registry")

    def distill(self, method: str) -> dict[str, Any]:
        """Train a LoRA policy with `method` on iteration T's guided rollouts (APA advantages from
        the final chain) and publish it as `<name>-<method>` (adopting a version this run published
        before a kill)."""
        from common.model_store import resolve_model
        from trainer.distill import DistillTrainer
        from trainer.value_trainer import examples_from_records, read_rollouts
        from valuefn.loader import BackbonePool, ValueLoader

        T = self.config.iterations
        name, final = self.policy_name(method), self.state.version(T)
        current = self.policies.current(name)
        if current is not None:
            training = self.policies.manifest(name, current).training
            if training.get("loop_run") == self.state.run_id and training.get("method") == method:
                log.info("distill %s: adopting %s v%d, already published by this run", method, name, current)
                return self._distill_info(name, current, adopted=True)
        # Samples of an earlier policy under this name (a re-distillation) must not pass for this one's:
        # the eval stage resumes from this file.
        (self.run_dir / "eval" / f"{self._policy_method(method).file_stem()}.jsonl").unlink(missing_ok=True)
        data = self._dir(T) / "labelled.jsonl"
        examples, skipped = examples_from_records(read_rollouts(data))
        if not examples:
            raise LoopError(f"no usable rollouts to distil in {data} (skipped: {skipped})")
        config = self.config.distill_config(method, progress=self.config.progress)
        model_path = resolve_model(self.model)
        chain = None
        if method == "apa":  # per-token advantages: temporal differences of the final value
            chain = ValueLoader(self.registry, BackbonePool(model_path)).load_chain(self.name, final)
        start = time.perf_counter()
        trainer = DistillTrainer(config, model_path)
        result = trainer.train(examples, value=chain, data=str(data),
                               extra={"loop_run": self.state.run_id, "value": f"{self.name}@{final}",
                                      "reward": self.task.reward})
        result.training["command_seconds"] = round(time.perf_counter() - start, 3)
        version = trainer.publish(result, self.policies, name)
        del trainer, result, chain
        gc.collect()
        return self._distill_info(name, version, skipped=skipped)

    def _distill_info(self, name: str, version: int, *, adopted: bool = False,
                      skipped: dict | None = None) -> dict[str, Any]:
        manifest = self.policies.manifest(name, version)
        training, metrics = manifest.training, manifest.metrics
        after, before = metrics.get("eval") or {}, metrics.get("eval_before") or {}
        return {"policy": name, "version": version, "method": manifest.method, "value": training.get("value"),
                "steps": training.get("steps"), "examples": training.get("examples"),
                "distill_seconds": training.get("command_seconds") or training.get("wall_seconds"),
                "heldout_loss_before": before.get("loss"), "heldout_loss": after.get("loss"),
                "kl_to_base": after.get("kl_to_base"), "adopted": adopted, "skipped": skipped or {}}

    def serve_policy(self, method: str) -> dict[str, Any]:
        """Wait until the server serves the distilled version (GET /v1/policies/NAME) and lists
        the policy in /v1/models."""
        trained = self.state.stage(f"distill/{method}/train")
        name, version = trained["policy"], trained["version"]
        start = time.monotonic()
        deadline = start + self.config.publish_timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            r = self._admin_get(f"/v1/policies/{name}")
            if r.status_code == 200:
                status = r.json()
                refused = next((x for x in status.get("refused", []) if x["version"] == version), None)
                if refused is not None:
                    raise LoopError(f"the server refused policy {name} v{version}: {refused['reason']}")
                if status.get("served_version") == version:
                    models = self._models()
                    if name in models:
                        return {"policy": name, "version": version, "wait_seconds": round(time.monotonic() - start, 2)}
            time.sleep(0.25)  # polling the server's state against a deadline
        raise LoopError(f"policy {name} v{version} not served after {self.config.publish_timeout:.0f} s (server: "
                        f"{status or 'unknown policy'}); is --policies-dir the server's ({self.policies.root})?")

    def _models(self) -> set[str]:
        from clients import IroClient

        with IroClient(self.server, api_key=self.api_key) as client:
            return {card.id for card in client.models().data}

    @staticmethod
    def _policy_method(method: str, model: str | None = None) -> Method:
        return Method(f"distilled-{method}", f"distilled ({DISTILL_LABELS.get(method, method)})", "distilled",
                      model=model)

    def evaluate_policy(self, method: str) -> dict[str, Any]:
        """The distilled policy on the held-out prompts: plain sampling (N = 1) through its model
        name, with base's max_tokens, temperature and seeds."""
        from common.model_store import resolve_model

        trained = self.state.stage(f"distill/{method}/train")
        policy = self._policy_method(method, trained["policy"])
        template = self._template(seed=self.config.seed * 1000 + 999, tokenizer=str(resolve_model(self.model)))
        result = evaluate_method(policy, self._eval_prompts(), self.run_dir / "eval", reward=self.task.reward,
                                 template=template)
        result.kl_to_base, result.versions = trained.get("kl_to_base"), [trained["version"]]
        return {"result": result.to_dict(), "distill_seconds": trained.get("distill_seconds")}

    # ------------------------------------------------------------------ report
    def results(self) -> tuple[list[MethodResult], list[MethodResult]]:
        """(IRO-t for t = 1..T, baselines) from the state."""
        iro = [MethodResult.from_dict(self.state.stage(f"it{t}/eval")["result"])
               for t in range(1, self.config.iterations + 1) if self.state.stage(f"it{t}/eval")]
        final = self.state.version(self.config.iterations)
        base = self.state.stage(f"baselines/v{final}") or {"results": []}
        return iro, [MethodResult.from_dict(r) for r in base["results"]]

    def distilled(self) -> list[MethodResult]:
        """The evaluated distilled policies, in the order of `config.distill`."""
        return [MethodResult.from_dict(self.state.stage(f"distill/{m}/eval")["result"])
                for m in self.config.distill if self.state.stage(f"distill/{m}/eval")]

    def report(self) -> Path:
        """Write `report.md` and the two plots from the state; returns the report's path."""
        from trainer.plots import plot_iterations, plot_reward_vs_tokens

        iro, baselines = self.results()
        distilled = self.distilled()
        seconds = {r.label: self.state.stage(f"distill/{r.name.removeprefix('distilled-')}/eval").get("distill_seconds")
                   for r in distilled}
        plot_reward_vs_tokens(baselines + distilled + iro, self.run_dir / "reward_vs_tokens.png",
                              title=f"{self.task.name}: reward vs tokens generated")
        plot_iterations(iro, baselines, self.run_dir / "reward_per_iteration.png",
                        title=f"{self.task.name}: held-out reward per IRO iteration")
        path = self.run_dir / "report.md"
        path.write_text(render_report(self, iro, baselines, distilled, seconds))
        return path


__all__ = ["IroLoop", "LoopConfig", "LoopError", "RunState", "closing_note", "render_report", "verdict"]
