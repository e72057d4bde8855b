"""Train a value function V_t on labelled rollouts, initialised from V_{t-1}, and publish it.

Every response token regresses its return (the final reward with gamma = 1, see
`trainer.returns`) with a mean squared error over response tokens only: prompt and padding never
count. Sequences are the rollout's own `prompt_token_ids + response_token_ids` (no
re-tokenisation), right-padded; where each response starts and ends comes from the lengths each
example carries, never from looking for pad ids (SmolLM2's pad token also ends chat turns).

    config = ValueTrainConfig.from_preset("smoke")
    trainer = ValueTrainer(config, model_path, registry=Registry(values_dir), name="demo")
    result = trainer.train(examples_from_records(read_rollouts("labelled.jsonl"))[0])
    version = trainer.publish(result)          # chain = previous chain + this version
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.dtype import log_dtype
from common.search_settings import SearchSettings
from trainer.optimization import Optimizer, total_steps
from trainer.returns import gae_targets_batch, mc_returns_batch
from trainer.value_config import ValueTrainConfig
from valuefn.checkpoint import (
    ADAPTER_FILE, HEAD_FILE, MANIFEST, CheckpointError, Manifest, build_value_model, check_backbone,
    load_trained_tensors, read_manifest, sha256_file, verify_files, write_checkpoint_files,
)
from valuefn.loader import BackbonePool, make_manifest, publish_model
from valuefn.model import POOLING_SHIFT, ValueModel, default_device, pool_response
from valuefn.registry import Registry

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Example:
    """One labelled rollout: token ids exactly as the engine produced them, and its reward."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    reward: float
    group: str
    """The prompt id: all samples of a prompt land on the same side of the held-out split."""


def read_rollouts(path: str | Path) -> list[dict]:
    """The records of a rollout JSONL file (one JSON object per line; blank lines are skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _token_ids(record: dict, key: str, where: str) -> tuple[int, ...]:
    ids = record.get(key)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{where}: {key!r} must be a list of token ids")
    return tuple(ids)


def examples_from_records(records: Iterable[dict]) -> tuple[list[Example], dict[str, int]]:
    """Training examples from rollout records, and counts of what was skipped and why
    (`unlabelled`: reward is null, `empty_response`: no response tokens)."""
    examples: list[Example] = []
    skipped: dict[str, int] = defaultdict(int)
    for n, record in enumerate(records):
        where = f"record {n} (id {record.get('id')!r})"
        reward = record.get("reward")
        if reward is None:
            skipped["unlabelled"] += 1
            continue
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise ValueError(f"{where}: reward must be a finite number or null, got {reward!r}")
        prompt_ids = _token_ids(record, "prompt_token_ids", where)
        response_ids = _token_ids(record, "response_token_ids", where)
        if not prompt_ids:
            raise ValueError(f"{where}: empty prompt_token_ids")
        if not response_ids:
            skipped["empty_response"] += 1
            continue
        group = record.get("prompt_id")
        examples.append(Example(prompt_ids, response_ids, float(reward), str(group if group is not None else record.get("id", n))))
    return examples, dict(skipped)


def rollout_policies(records: Iterable[dict]) -> list[dict]:
    """The distinct policies that produced `records`: [{"value", "versions", "mode", "count"}].

    >>> rollout_policies([{"policy": {"value": "demo", "versions": [1], "mode": "cbs"}}, {"policy": None}])
    [{'value': 'demo', 'versions': [1], 'mode': 'cbs', 'count': 1}, {'value': None, 'versions': [], 'mode': None, 'count': 1}]
    """
    counts: dict[tuple, int] = {}
    for record in records:
        policy = record.get("policy") or {}
        key = (policy.get("value"), tuple(policy.get("versions") or ()), policy.get("mode"))
        counts[key] = counts.get(key, 0) + 1
    return [{"value": v, "versions": list(vs), "mode": m, "count": n} for (v, vs, m), n in counts.items()]


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out), split by prompt so no prompt is on both sides; deterministic in `seed`."""
    groups = sorted({e.group for e in examples})
    random.Random(seed).shuffle(groups)
    n_eval = round(len(groups) * eval_fraction)
    if eval_fraction > 0 and len(groups) >= 2:
        n_eval = min(max(n_eval, 1), len(groups) - 1)
    held_out = set(groups[:n_eval])
    return [e for e in examples if e.group not in held_out], [e for e in examples if e.group in held_out]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) right-padded prompt + response
    attention_mask: torch.Tensor  # (B, L)
    prompt_lens: torch.Tensor  # (B,)
    lengths: torch.Tensor  # (B,) full response lengths
    kept: torch.Tensor  # (B,) response tokens inside max_len (>= 1)
    rewards: torch.Tensor  # (B,)
    tokens: int  # real (non-pad) tokens

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in ("input_ids", "attention_mask", "prompt_lens", "lengths",
                                                              "kept", "rewards")), self.tokens)


def collate(examples: Sequence[Example], max_len: int) -> Batch:
    seqs = [(e.prompt_ids + e.response_ids)[:max_len] for e in examples]
    B, L = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.zeros(B, L, dtype=torch.long)  # pad id is irrelevant: padding is masked and never read
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    prompt_lens = torch.tensor([len(e.prompt_ids) for e in examples])
    return Batch(input_ids, attention_mask, prompt_lens,
                 lengths=torch.tensor([len(e.response_ids) for e in examples]),
                 kept=torch.tensor([len(s) for s in seqs]) - prompt_lens,
                 rewards=torch.tensor([e.reward for e in examples], dtype=torch.float),
                 tokens=sum(len(s) for s in seqs))


def response_values(values: torch.Tensor, prompt_lens: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L) values over the whole sequence -> (B, width) values at response tokens 0..width-1."""
    idx = prompt_lens[:, None] + torch.arange(width, device=values.device)[None, :]  # (B, W)
    return values.gather(1, idx.clamp(max=values.shape[1] - 1))


def batches(examples: Sequence[Example], batch_size: int, rng: random.Random | None) -> list[list[Example]]:
    """Batches of similar length (less padding) in random order; in order when `rng` is None."""
    if rng is None:
        return [list(examples[i: i + batch_size]) for i in range(0, len(examples), batch_size)]
    order = list(range(len(examples)))
    rng.shuffle(order)
    mega = batch_size * 16
    out = []
    for m in range(0, len(order), mega):
        chunk = sorted(order[m: m + mega], key=lambda i: len(examples[i].prompt_ids) + len(examples[i].response_ids))
        out += [[examples[i] for i in chunk[b: b + batch_size]] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- metrics
def _ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    average = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    return average[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties averaged); None when either side is constant.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 30, 25]), 6)
    0.8
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def pairwise_accuracy(pred: Sequence[float], reward: Sequence[float], groups: Sequence[str] | None = None) -> float | None:
    """Fraction of pairs with different rewards that `pred` orders the same way (ties count 1/2);
    with `groups`, only pairs within a group (candidates of one prompt, what the search compares).

    >>> pairwise_accuracy([0.1, 0.2, 0.3], [1, 2, 0])
    0.3333333333333333
    """
    p, r = np.asarray(pred, dtype=float), np.asarray(reward, dtype=float)
    if len(p) > 3000:  # O(n^2) pairs: a fixed subsample is plenty for a metric
        keep = np.random.default_rng(0).choice(len(p), 3000, replace=False)
        p, r = p[keep], r[keep]
        groups = None if groups is None else [groups[i] for i in keep]
    dr = np.sign(r[:, None] - r[None, :])
    dp = np.sign(p[:, None] - p[None, :])
    valid = np.triu(dr != 0, k=1)
    if groups is not None:
        g = np.asarray(groups)
        valid &= g[:, None] == g[None, :]
    if not valid.any():
        return None
    agree = np.where(dp == 0, 0.5, (dp == dr).astype(float))
    return float(agree[valid].mean())


# --------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    model: ValueModel
    identity: dict
    init_from: int | None
    """The version this one was initialised from (None: fresh)."""
    defaults: SearchSettings
    training: dict[str, Any]
    metrics: dict[str, Any]
    history: list[float] = field(default_factory=list)
    """Training loss of every step."""


class ValueTrainer:
    """Builds V_t (from V_{t-1} in the registry when there is one), trains it, evaluates it."""

    def __init__(self, config: ValueTrainConfig, model_path: str | Path, *, registry: Registry | None = None,
                 name: str | None = None, pool: BackbonePool | None = None):
        self.config = config
        self.registry = registry
        self.name = name
        if config.threads:
            torch.set_num_threads(config.threads)
        device = default_device() if config.device == "auto" else torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available (use device=auto or cpu)")
        # "auto" becomes this machine's dtype now, so the manifest records the one it trained in
        dtype = log_dtype("trainer", config.model.dtype, device.type)
        self.config = config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})})
        self.pool = pool or BackbonePool(model_path, device)
        self.device = self.pool.device
        # The version the new one will follow in the chain (publishing refuses if CURRENT moved).
        self.parent = registry.current(name) if (registry is not None and name) else None
        self.model, self.init_from, self.defaults = self._build_model()
        self.model.train()
        self._features: dict[Example, torch.Tensor] | None = None
        """The head's inputs per example when the backbone is frozen (`lora_r=0`): computed once,
        so an epoch costs a head pass, not a backbone pass."""

    @torch.no_grad()  # not inference_mode: the head's backward saves these tensors
    def _cache_features(self, examples: Sequence[Example]) -> None:
        from tqdm.auto import tqdm

        c = self.config
        self._features = {}
        chunks = batches(examples, c.eval_batch_size, None)
        for chunk in tqdm(chunks, desc="features", unit="batch", disable=not c.progress, dynamic_ncols=True):
            batch = collate(chunk, c.max_len).to(self.device)
            B, L = batch.input_ids.shape
            position_ids = torch.arange(L, device=self.device).expand(B, L)
            features, _ = self.model.features(batch.input_ids, attention_mask=batch.attention_mask,
                                              position_ids=position_ids)  # (B, L, D)
            for i, e in enumerate(chunk):
                self._features[e] = features[i, : int(batch.attention_mask[i].sum())].clone()

    def _build_model(self) -> tuple[ValueModel, int | None, SearchSettings]:
        c = self.config
        torch.manual_seed(c.seed)
        previous = self.parent if c.init_from_previous else None
        if previous is None:
            arch = c.architecture(self.pool.identity["total_layers"])
            return ValueModel(self.pool.fresh(arch), arch), None, SearchSettings()
        directory = self.registry.path(self.name, previous)
        manifest = read_manifest(directory)
        check_backbone(manifest, self.pool.identity, directory)
        adapter, head = load_trained_tensors(directory, manifest)
        ours = c.architecture(self.pool.identity["total_layers"]).model_dump(
            include={"num_layers", "lora_r", "lora_alpha", "pooling", "value_layers"})
        theirs = {k: getattr(manifest.model, k) for k in ours}
        if ours != theirs:
            log.warning("initialising from %s v%d: its architecture %s is kept (config asked for %s)",
                        self.name, previous, theirs, ours)
        # the architecture is the previous version's; the dtype this machine's (or the one asked for)
        manifest = manifest.model_copy(update={"model": manifest.model.model_copy(update={"dtype": c.model.dtype})})
        model = build_value_model(self.pool.fresh(manifest.model), manifest, adapter, head, for_inference=False)
        log.info("initialised from %s v%d", self.name, previous)
        return model, previous, manifest.defaults

    # ------------------------------------------------------------------ one step
    def _targets(self, batch: Batch, pred: torch.Tensor) -> torch.Tensor:
        W = pred.shape[1]
        if self.config.gae_lambda is None:
            return mc_returns_batch(batch.rewards, batch.lengths, W, self.config.gamma)
        return gae_targets_batch(batch.rewards, pred.detach(), batch.lengths, batch.kept, self.config.gamma,
                                 self.config.gae_lambda)

    def _forward(self, batch: Batch, examples: Sequence[Example] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted values at response tokens (B, W) and their mask (B, W)."""
        B, L = batch.input_ids.shape
        if examples is not None and self._features is not None and all(e in self._features for e in examples):
            features = torch.zeros(B, L, self.model.head.in_features, device=self.device)
            for i, e in enumerate(examples):
                f = self._features[e]
                features[i, : len(f)] = f
            values = self.model.head(features).squeeze(-1)  # (B, L)
        else:
            position_ids = torch.arange(L, device=self.device).expand(B, L)
            values, _ = self.model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)  # (B, L)
        W = int(batch.kept.max())
        pooling = self.model.config.pooling
        starts = batch.prompt_lens - POOLING_SHIFT[pooling]  # the positions whose outputs value the response
        pred = pool_response(response_values(values, starts, W), pooling)  # (B, W)
        mask = torch.arange(W, device=self.device)[None, :] < batch.kept[:, None]
        return pred, mask

    @staticmethod
    def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ((pred - target) ** 2 * mask).sum() / mask.sum()

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def evaluate(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Held-out metrics: token MSE against Monte-Carlo returns, and how the value at the last
        response token tracks the reward (MSE, Spearman, pairwise ranking accuracy)."""
        if not examples:
            return {}
        was_training = self.model.training
        self.model.eval()
        sq_sum, n_tokens, finals = 0.0, 0, []
        for chunk in batches(examples, self.config.eval_batch_size, None):
            batch = collate(chunk, self.config.max_len).to(self.device)
            pred, mask = self._forward(batch, chunk)
            target = mc_returns_batch(batch.rewards, batch.lengths, pred.shape[1], self.config.gamma)
            sq_sum += float(((pred - target) ** 2 * mask).sum())
            n_tokens += int(mask.sum())
            finals += pred[torch.arange(len(chunk), device=self.device), batch.kept - 1].float().cpu().tolist()
        self.model.train(was_training)
        rewards = [e.reward for e in examples]
        return {
            "examples": len(examples),
            "mse": sq_sum / n_tokens,
            "final_mse": float(np.mean((np.asarray(finals) - np.asarray(rewards)) ** 2)),
            "spearman": spearman(finals, rewards),
            "pair_acc": pairwise_accuracy(finals, rewards),
            "pair_acc_same_prompt": pairwise_accuracy(finals, rewards, [e.group for e in examples]),
            "reward_mean": float(np.mean(rewards)),
        }

    # ------------------------------------------------------------------ the loop
    def train(self, examples: Sequence[Example], *, data: str | None = None, extra: dict | None = None) -> TrainResult:
        """Train on `examples` (after holding out `eval_fraction` of the prompts); return the model
        with its training metadata and held-out metrics."""
        from tqdm.auto import tqdm

        c = self.config
        kept = [e for e in examples if len(e.prompt_ids) < c.max_len]
        too_long = len(examples) - len(kept)
        if too_long:
            log.warning("skipping %d examples whose prompt alone fills max_len=%d", too_long, c.max_len)
        train_set, eval_set = split_examples(kept, c.eval_fraction, c.seed)
        if not train_set:
            raise ValueError("no training examples (are the rollouts labelled? see `iro reward`)")
        if self.init_from is None:
            # A fresh head starts at about "every response is worth the mean reward": a random head's
            # large initial errors would spend the first steps undoing it. Small rather than zero
            # weights, so the LoRA adapters get a gradient from the first step on.
            with torch.no_grad():
                self.model.head.weight.normal_(std=0.01 / self.model.head.in_features**0.5)
                self.model.head.bias.fill_(float(np.mean([e.reward for e in train_set])))
        steps_per_epoch = math.ceil(len(train_set) / c.batch_size)
        total = total_steps(len(train_set), c.batch_size, c.epochs, c.max_steps)
        params = self.model.trainable_parameters()
        optimizer = Optimizer(params, lr=c.lr, weight_decay=c.weight_decay, total=total,
                              warmup=math.ceil(c.warmup_ratio * total), max_grad_norm=c.max_grad_norm)
        log.info("value training: %d train / %d held-out examples, %d steps, %d trainable parameters",
                 len(train_set), len(eval_set), total, sum(p.numel() for p in params))

        if self.model.config.lora_r == 0:  # a frozen backbone: its outputs never change
            self._cache_features(kept)
        before = self.evaluate(eval_set)
        rng = random.Random(c.seed)
        history: list[float] = []
        tokens, train_seconds, step = 0, 0.0, 0
        bar = tqdm(total=total, desc="value", unit="step", disable=not c.progress, dynamic_ncols=True)
        self.model.train()
        for epoch in range(c.epochs):
            for chunk in batches(train_set, c.batch_size, rng):
                if step >= total:
                    break
                start = time.perf_counter()
                batch = collate(chunk, c.max_len).to(self.device)
                pred, mask = self._forward(batch, chunk)
                loss = self._masked_mse(pred, self._targets(batch, pred), mask)
                optimizer.step(loss)
                train_seconds += time.perf_counter() - start
                tokens += batch.tokens
                step += 1
                history.append(loss.detach().item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4f}", tok_s=f"{tokens / train_seconds:.0f}")
        bar.close()
        after = self.evaluate(eval_set)
        self._features = None
        self.model.eval()
        if after:
            log.info("held-out: mse %.4f -> %.4f, spearman %s, pair_acc %s", before["mse"], after["mse"],
                     after["spearman"], after["pair_acc"])
        training = {
            "kind": "value", "data": data, "parent": self.parent, "init_from": self.init_from, "config": c.to_dict(),
            "examples": {"train": len(train_set), "eval": len(eval_set), "skipped_prompt_too_long": too_long},
            "steps": step, "tokens": tokens, "seconds": round(train_seconds, 3), "dtype": self.model.config.dtype,
            "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds else None,
            "finished_at": time.time(), **(extra or {}),
        }
        metrics = {"eval": after, "eval_before": before,
                   "train_loss_last": float(np.mean(history[-max(1, steps_per_epoch):])) if history else None}
        return TrainResult(self.model, self.pool.identity, self.init_from, self.defaults, training, metrics, history)

    # ------------------------------------------------------------------ keeping the result
    def publish(self, result: TrainResult, *, beta: float = 1.0) -> int:
        """Publish into the registry as the next version of `name`; chain = previous chain + it."""
        if self.registry is None or not self.name:
            raise ValueError("publishing needs a registry and a value name")
        _check_parent(self.name, result.training.get("parent"), self.registry.current(self.name), force=False)
        return publish_model(self.registry, self.name, result.model, result.identity, extend_chain=True, beta=beta,
                             defaults=result.defaults, training=result.training, metrics=result.metrics)


def _check_parent(name: str, parent: int | None, current: int | None, *, force: bool, directory: Path | None = None):
    if parent != current and not force:
        raise CheckpointError(
            f"{name}: this value was trained to follow {f'v{parent}' if parent else 'nothing'} but CURRENT is "
            f"{f'v{current}' if current else 'unset'} now; retrain on fresh rollouts (or force it)",
            reason="stale_parent", path=directory)


def save_result(result: TrainResult, directory: str | Path, name: str) -> Path:
    """Write a trained, unpublished checkpoint (adapter + head + manifest) to `directory`;
    `publish_saved` puts it into a registry later."""
    directory = Path(directory)
    files = write_checkpoint_files(result.model, directory)
    manifest = make_manifest(name, result.model.config, result.identity, defaults=result.defaults,
                             training=result.training, metrics=result.metrics).model_copy(update={"files": files})
    (directory / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return directory


def publish_saved(directory: str | Path, registry: Registry, name: str | None = None, *, beta: float = 1.0,
                  force: bool = False) -> tuple[str, int]:
    """Publish a checkpoint folder written by `save_result`; returns (name, version).

    Refused when its files do not match their hashes, when its backbone differs from the
    registry's current version, or (unless `force`) when it was trained from another version
    than the current one.
    """
    directory = Path(directory)
    manifest: Manifest = read_manifest(directory)
    verify_files(directory, manifest)
    name = name or manifest.name
    current = registry.current(name)
    if current is not None:
        check_backbone(registry.manifest(name, current), manifest.backbone, directory)
    _check_parent(name, manifest.training.get("parent"), current, force=force, directory=directory)

    def write(tmp: Path) -> dict[str, str]:
        for file in (ADAPTER_FILE, HEAD_FILE):
            shutil.copyfile(directory / file, tmp / file)
        return {file: sha256_file(tmp / file) for file in (ADAPTER_FILE, HEAD_FILE)}

    base = manifest.model_dump(exclude={"files", "version", "chain", "created_at"})
    version = registry.publish(name, write, base | {"version": 1, "chain": [{"version": 1}]}, extend_chain=True, beta=beta)
    return name, version


__all__ = ["Batch", "Example", "TrainResult", "ValueTrainer", "collate", "examples_from_records", "pairwise_accuracy",
           "publish_saved", "read_rollouts", "rollout_policies", "response_values", "save_result", "spearman", "split_examples"]
