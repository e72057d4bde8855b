"""The loop's distillation stages (after the last iteration, one set per method): train a LoRA
policy on iteration T's guided rollouts (or, with `distill_from`, on the base model's samples or the
final policy's own rollouts: the loop's `distill-data/` stages), publish it into the policy registry
the server watches, wait until the server serves it, and evaluate it with plain sampling through its model name.

    distill/<method>/train   `iro distill` (APA advantages from the final chain V_1..V_T; IS-DPO pairs
                             by reward) -> `<value name>-<method>` in the policy registry
    distill/<method>/serve   GET /v1/policies/NAME until it serves the version, and /v1/models lists it
    distill/<method>/eval    the held-out prompts, N = 1, with base's max_tokens, temperature and seeds

The server must run `iro serve --policies-dir DIR` on the loop's `policies_dir`: `check_server`
says so (GET /v1/policies) before any work. The server is asked through `IroClient`'s policy methods.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.eval_results import MethodResult
from trainer.evaluate import Method
from trainer.loop_config import LoopConfig
from trainer.loop_state import LoopError, RunState, ServerLink

log = logging.getLogger(__name__)

DISTILL_LABELS = {"apa": "APA", "is-dpo": "IS-DPO", "is-ipo": "IS-IPO"}
DISTILL_DATA = "distill-data"
"""The run's folder of the rollouts distillation learns from when `distill_from` is not `last`."""
DISTILL_DATA_STAGES = ("distill-data/rollout", "distill-data/reward")
"""The loop's stages that collect and label them (in this order)."""


def policy_name(config: LoopConfig, value_name: str, method: str) -> str:
    """`<distill_name or value name>-<method>`: a distilled policy's name in the registry and its model name."""
    return f"{config.distill_name or value_name}-{method}"


def policy_method(method: str, model: str | None = None) -> Method:
    """The evaluation method of a distilled policy (`model`: its model name)."""
    return Method(f"distilled-{method}", f"distilled ({DISTILL_LABELS.get(method, method)})", "distilled",
                  model=model)


class DistillStages:
    """The distillation stages of one run, over what the run shares: its `config` and `state`, the
    value `name` whose final chain guides, the registries, the server, and `evaluate` (a method on the
    loop's held-out prompts; keyword arguments go to the rollout template)."""

    def __init__(self, config: LoopConfig, state: RunState, *, name: str, reward: str, run_dir: Path, registry,
                 policies, server: ServerLink, model: str | None,
                 evaluate: Callable[..., MethodResult]):
        self.config, self.state, self.name, self.reward = config, state, name, reward
        self.run_dir, self.registry, self.policies = run_dir, registry, policies
        self.server, self.model, self._evaluate = server, model, evaluate

    def policy_name(self, method: str) -> str:
        """This run's policy of `method` (`policy_name`)."""
        return policy_name(self.config, self.name, method)

    def check_server(self) -> None:
        """Fail before any work unless the server serves the policy registry the loop publishes to."""
        from clients.errors import APIStatusError, AuthenticationError, NotFoundError, PermissionDeniedError, TransportError

        try:
            with self.server.client() as client:
                served = client.policies().registry
        except NotFoundError as exc:
            raise LoopError(f"--distill needs a server that serves policies: the server at {self.server.url} has no "
                            f"policy registry; restart it with `iro serve --policies-dir {self.policies.root}`") from exc
        except (AuthenticationError, PermissionDeniedError) as exc:
            raise LoopError(f"the server refused GET /v1/policies ({exc.status_code}): pass its admin key "
                            "(--admin-key or IRO_ADMIN_KEY)") from exc
        except APIStatusError as exc:
            raise LoopError(f"GET /v1/policies answered {exc.status_code}: {exc}") from exc
        except TransportError as exc:
            raise LoopError(f"cannot reach the server at {self.server.url}: {exc}") from exc
        if served is not None and not self.policies.same_location(served):  # a folder or s3://bucket/prefix
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

    def data_path(self) -> Path:
        """The labelled rollouts distillation learns from: iteration T's training rollouts (`distill_from`
        last), else those the loop collected for it (`distill-data/`)."""
        if self.config.distill_from != "last":
            return self.run_dir / DISTILL_DATA / "labelled.jsonl"
        return self.run_dir / f"it{self.state.last_iteration(self.config.iterations)}" / "labelled.jsonl"

    def reference(self, config) -> list | None:
        """The base model's samples of the training prompts, which `overuse_weight` measures the
        training responses against: iteration 1's rollouts (None when the option is off). With
        `distill_from` base the data are much the same samples, and the trainer logs that next to no
        bigram is over-used."""
        from trainer.value_trainer import examples_from_records, read_rollouts

        if not config.overuse_weight:
            return None
        return examples_from_records(read_rollouts(self.run_dir / "it1" / "labelled.jsonl"))[0]

    def train(self, method: str) -> dict[str, Any]:
        """Train a LoRA policy with `method` on iteration T's guided rollouts (APA advantages from
        the final chain) and publish it as `<name>-<method>` (adopting a version this run published
        before a kill)."""
        from common.model_store import resolve_model
        from trainer.distill import DistillTrainer, prompt_texts
        from trainer.rewards import parse_reward
        from trainer.value_trainer import examples_from_records, read_rollouts
        from valuefn.loader import BackbonePool, ValueLoader

        T = self.state.last_iteration(self.config.iterations)
        name, final = self.policy_name(method), self.state.version(T)
        current = self.policies.current(name)
        if current is not None:
            training = self.policies.manifest(name, current).training
            if training.get("loop_run") == self.state.run_id and training.get("method") == method:
                log.info("distill %s: adopting %s v%d, already published by this run", method, name, current)
                return self._info(name, current, adopted=True)
        # Samples of an earlier policy under this name (a re-distillation) must not pass for this one's:
        # the eval stage resumes from this file.
        (self.run_dir / "eval" / f"{policy_method(method).file_stem()}.jsonl").unlink(missing_ok=True)
        data = self.data_path()
        records = read_rollouts(data)
        examples, skipped = examples_from_records(records)
        if not examples:
            raise LoopError(f"no usable rollouts to distil in {data} (skipped: {skipped})")
        config = self.config.distill_config(method, progress=self.config.progress)
        model_path = resolve_model(self.model)
        chain = None
        if method == "apa":  # per-token advantages: temporal differences of the final value
            chain = ValueLoader(self.registry, BackbonePool(model_path)).load_chain(self.name, final)
        start = time.perf_counter()
        trainer = DistillTrainer(config, model_path)
        # the task's reward and the prompts' text: checkpoints are selected on held-out reward and distinct-2
        result = trainer.train(examples, value=chain, reward_fn=parse_reward(self.reward),
                               prompt_texts=prompt_texts(records), data=str(data),
                               extra={"loop_run": self.state.run_id, "value": f"{self.name}@{final}",
                                      "reward": self.reward}, reference=self.reference(config))
        result.training["command_seconds"] = round(time.perf_counter() - start, 3)
        version = trainer.publish(result, self.policies, name)
        del trainer, result, chain
        gc.collect()
        return self._info(name, version, skipped=skipped)

    def _info(self, name: str, version: int, *, adopted: bool = False, skipped: dict | None = None) -> dict[str, Any]:
        manifest = self.policies.manifest(name, version)
        training, metrics = manifest.training, manifest.metrics
        after, before = metrics.get("eval") or {}, metrics.get("eval_before") or {}
        return {"policy": name, "version": version, "method": manifest.method, "value": training.get("value"),
                "steps": training.get("steps"), "examples": training.get("examples"),
                "distill_seconds": training.get("command_seconds") or training.get("wall_seconds"),
                "heldout_loss_before": before.get("loss"), "heldout_loss": after.get("loss"),
                "kl_to_base": after.get("kl_to_base"), "adopted": adopted, "skipped": skipped or {}}

    def serve(self, method: str) -> dict[str, Any]:
        """Wait until the server serves the distilled version (GET /v1/policies/NAME) and lists
        the policy in /v1/models."""
        from clients.errors import NotFoundError

        trained = self.state.stage(f"distill/{method}/train")
        name, version = trained["policy"], trained["version"]
        start = time.monotonic()
        deadline = start + self.config.publish_timeout
        status = None
        with self.server.client() as client:
            while time.monotonic() < deadline:
                try:
                    status = client.policy(name)
                except NotFoundError:  # its watcher has not seen the new policy yet
                    status = None
                if status is not None:
                    refused = next((x for x in status.refused if x.version == version), None)
                    if refused is not None:
                        raise LoopError(f"the server refused policy {name} v{version}: {refused.reason}")
                    if status.serving_version == version and name in {card.id for card in client.models().data}:
                        return {"policy": name, "version": version, "wait_seconds": round(time.monotonic() - start, 2)}
                time.sleep(0.25)  # polling the server's state against a deadline
        seen = f"it serves v{status.serving_version}" if status is not None else "it does not know the policy"
        raise LoopError(f"policy {name} v{version} not served after {self.config.publish_timeout:.0f} s ({seen}); "
                        f"is --policies-dir the server's ({self.policies.root})?")

    def evaluate(self, method: str) -> dict[str, Any]:
        """The distilled policy on the held-out prompts: plain sampling (N = 1) through its model
        name, with base's max_tokens, temperature and seeds."""
        from common.model_store import resolve_model

        trained = self.state.stage(f"distill/{method}/train")
        result = self._evaluate(policy_method(method, trained["policy"]), tokenizer=str(resolve_model(self.model)))
        result.kl_to_base, result.versions = trained.get("kl_to_base"), [trained["version"]]
        return {"result": result.to_dict(), "distill_seconds": trained.get("distill_seconds")}

    def results(self) -> tuple[list[MethodResult], dict[str, float | None]]:
        """The evaluated distilled policies, in the order of `config.distill`, and each one's
        distillation wall time by label."""
        done = [(m, self.state.stage(f"distill/{m}/eval")) for m in self.config.distill]
        done = [(m, info) for m, info in done if info]
        results = [MethodResult.from_dict(info["result"]) for _, info in done]
        return results, {r.label: info.get("distill_seconds") for r, (_, info) in zip(results, done)}


__all__ = ["DISTILL_DATA", "DISTILL_DATA_STAGES", "DISTILL_LABELS", "DistillStages", "policy_method", "policy_name"]
