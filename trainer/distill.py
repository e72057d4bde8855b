"""Distil guided rollouts into a LoRA policy on the frozen base model (APA or IS-DPO) and publish it.

The base model stays frozen; a peft LoRA adapter is the only thing trained, and the reference
policy (pi_init of APA, pi_ref of IS-DAAs) is the same network with the adapter switched off, so
no second copy of the base model is held. Data is `iro rollout` + `iro reward` output (the value
trainer's `Example`s: the engine's own token ids and a reward per response).

- APA regresses every response token's log-ratio onto A_t / lambda. With `value=` (a loaded
  `ValueChain`), A_t is the temporal difference of its newest value along the response (chunk by
  chunk, V after the last token = the reward), so the advantages of a response sum to R - V(prompt).
  Without one, the baseline is the mean reward of the prompt's samples and the response is the
  action: its summed log-ratio regresses (R - baseline) / lambda (`apa_sequence_loss`).
- IS-DPO / IS-IPO pair the samples of each prompt by reward (best vs worst, ...); rollouts
  without a reward are ranked by the value instead (`distill_examples`: V of the newest value
  after the whole response).
- Checkpoints (`trainer/distill_checkpoints.py`): every `eval_every` steps the trainer measures the
  per-token KL to the base on the held-out rollouts and the reward and distinct-2 of plain samples
  on a few held-out prompts, and keeps the adapter weights in memory; training stops once the KL
  reaches `kl_budget` (PPO's target KL), and the checkpoint `select` chooses (by default the highest
  held-out reward with distinct-2 inside its bound, and with `kl_rule: bound` the KL inside the
  budget too) is the one returned and published.
  `metrics["selection"]` in the manifest holds every checkpoint's row and why the one was chosen.

    config = DistillConfig.from_preset("smoke", method="apa")
    trainer = DistillTrainer(config, model_path)
    result = trainer.train(examples, reward_fn=sentiment, prompt_texts=texts)
    version = trainer.publish(result, PolicyRegistry(policies_dir), "review-apa")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.dtype import log_dtype

from trainer.distill_checkpoints import STOP_SLACK, Checkpoint, select_checkpoint
from trainer.distill_config import DistillConfig
from trainer.distill_losses import apa_loss, apa_sequence_loss, cover_kl, is_daa_loss, sequence_logps, token_kl
from trainer.optimization import Optimizer, total_steps
from trainer.value_trainer import Example, batches, collate, split_examples
from valuefn.model import backbone_identity, default_device
from registry.policies import POLICY_FORMAT_VERSION, PolicyRegistry, write_adapter_files

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data
def group_baseline_advantages(examples: Sequence[Example]) -> list[float]:
    """R - mean reward of the prompt's samples (the global mean for a prompt sampled once).

    >>> e = lambda r, g: Example((1,), (2,), r, g)
    >>> group_baseline_advantages([e(1.0, "a"), e(0.0, "a"), e(0.5, "b")])
    [0.5, -0.5, 0.0]
    """
    by_group: dict[str, list[float]] = defaultdict(list)
    for e in examples:
        by_group[e.group].append(e.reward)
    overall = float(np.mean([e.reward for e in examples])) if examples else 0.0
    return [e.reward - (float(np.mean(by_group[e.group])) if len(by_group[e.group]) > 1 else overall) for e in examples]


def make_pairs(examples: Sequence[Example], pairs_per_prompt: int = 1,
               min_gap: float = 0.0) -> list[tuple[Example, Example]]:
    """(chosen, rejected) pairs within each prompt's samples: best vs worst, 2nd vs 2nd-worst, ...
    Pairs of equal reward, or whose rewards differ by less than `min_gap`, are dropped (they carry
    no preference, or one too weak to push a good answer down for).

    >>> e = lambda r: Example((1,), (2,), r, "p")
    >>> [(c.reward, r.reward) for c, r in make_pairs([e(0.2), e(0.9), e(0.5), e(0.1)], 2)]
    [(0.9, 0.1), (0.5, 0.2)]
    >>> [(c.reward, r.reward) for c, r in make_pairs([e(0.2), e(0.9), e(0.5), e(0.1)], 2, min_gap=0.5)]
    [(0.9, 0.1)]
    """
    by_group: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_group[e.group].append(e)
    pairs = []
    for group in sorted(by_group):
        ranked = sorted(by_group[group], key=lambda e: e.reward, reverse=True)
        for i in range(min(pairs_per_prompt, len(ranked) // 2)):
            chosen, rejected = ranked[i], ranked[-1 - i]
            if chosen.reward > rejected.reward and chosen.reward - rejected.reward >= min_gap:
                pairs.append((chosen, rejected))
    return pairs


OVERUSE_MIN_SHARE = 0.01
"""A token bigram counts as over-used only when at least this share of the training responses hold it
(rare bigrams are the diverse ones; their ratios are noise)."""


def held_bigrams(examples: Sequence[Example]) -> Counter:
    """{token bigram: how many of the responses hold it}."""
    return Counter(g for e in examples for g in set(zip(e.response_ids[:-1], e.response_ids[1:])))


def bigram_overuse(examples: Sequence[Example], reference: Sequence[Example], *,
                   min_share: float = OVERUSE_MIN_SHARE) -> dict[tuple[int, int], float]:
    """{token bigram: log of how much more often the training responses hold it than the reference
    responses (the base model's samples of the same prompts)}, for the bigrams held by at least
    `min_share` of the training responses and over-used (ratio > 1). Frequencies are the share of
    responses that hold the bigram, add-one smoothed: log((n_b + 1) / (m_b * N / M + 1)).

    >>> e = lambda *ids: Example((0,), ids, 0.0, "p")
    >>> table = bigram_overuse([e(1, 2, 3), e(1, 2, 4), e(5, 6)], [e(1, 2, 3), e(7, 8), e(7, 8)], min_share=0.5)
    >>> {g: round(v, 3) for g, v in table.items()}  # (1, 2): 2 of 3 vs 1 of 3; (2, 3) too rare
    {(1, 2): 0.405}
    """
    mine, theirs = held_bigrams(examples), held_bigrams(reference)
    n, m = len(examples), max(1, len(reference))
    floor = max(1.0, min_share * n)
    table = {g: math.log((c + 1) / (theirs[g] * n / m + 1)) for g, c in mine.items() if c >= floor}
    return {g: v for g, v in table.items() if v > 0}


def overuse_penalties(examples: Sequence[Example], table: dict[tuple[int, int], float]) -> list[list[float]]:
    """Per response token: the over-use (`bigram_overuse`) of the bigram it ends (0 for the first
    token and for bigrams not in `table`).

    >>> overuse_penalties([Example((0,), (1, 2, 1, 2), 0.0, "p")], {(1, 2): 0.5})
    [[0.0, 0.5, 0.0, 0.5]]
    """
    return [[0.0] * min(1, len(e.response_ids))
            + [table.get(g, 0.0) for g in zip(e.response_ids[:-1], e.response_ids[1:])] for e in examples]


def overuse_rewards(examples: Sequence[Example], table: dict[tuple[int, int], float], weight: float) -> list[Example]:
    """The examples with `weight` x their summed `overuse_penalties` taken off their rewards.

    >>> [e.reward for e in overuse_rewards([Example((0,), (1, 2, 1, 2), 1.0, "p")], {(1, 2): 0.5}, 0.1)]
    [0.9]
    """
    return [dataclasses.replace(e, reward=e.reward - weight * sum(p))
            for e, p in zip(examples, overuse_penalties(examples, table))]


def overuse_advantages(advantages: Sequence[Sequence[float]], penalties: Sequence[Sequence[float]],
                       weight: float) -> list[list[float]]:
    """Per-token advantages less `weight` x the token's `overuse_penalties`, but never below 0 where
    the advantage was positive: an over-used token loses its credit and is not pushed under the base
    model (that would spend KL on saying it less often than the base does). Negative ones stay.

    >>> overuse_advantages([[0.5, 0.1, -0.2, 0.3]], [[1.0, 1.0, 1.0, 0.0]], 0.25)
    [[0.25, 0.0, -0.2, 0.3]]
    """
    return [[max(a - weight * p, min(a, 0.0)) for a, p in zip(row, pen)] for row, pen in zip(advantages, penalties)]


def value_advantages(chain, examples: Sequence[Example], chunk: int = 8, *, progress: bool = False,
                     group: int = 64) -> list[list[float]]:
    """Per-token advantages from the newest value of `chain` (a `valuefn.scorer.ValueChain`):
    V at the prompt and every `chunk` response tokens, V = reward after the last token; the tokens
    of a chunk share its temporal difference equally. One forward pass per rollout, `group` rollouts
    at a time (a progress bar with `progress`)."""
    from tqdm.auto import tqdm

    from valuefn.scorer import ScoreItem, prefix_values

    value = chain.links[-1][0]
    cuts_of = [list(range(0, len(e.response_ids), chunk)) for e in examples]  # response lengths where V is read
    values: list[list[float]] = []
    with tqdm(total=len(examples), desc="value advantages", unit="rollout", disable=not progress,
              dynamic_ncols=True) as bar:
        for i in range(0, len(examples), group):
            part = examples[i: i + group]
            items = [ScoreItem(list(e.prompt_ids + e.response_ids), 0, len(e.prompt_ids)) for e in part]
            values += prefix_values(value, items, [[len(e.prompt_ids) + k for k in cuts]
                                                   for e, cuts in zip(part, cuts_of[i: i + group])])
            bar.update(len(part))
    out = []
    for e, cuts, vs in zip(examples, cuts_of, values):
        T = len(e.response_ids)
        v = [float(x) for x in vs] + [e.reward]
        adv = [0.0] * T
        for j, start in enumerate(cuts):
            end = min(start + chunk, T)
            for t in range(start, end):
                adv[t] = (v[j + 1] - v[j]) / (end - start)
        out.append(adv)
    return out


def value_labels(chain, examples: Sequence[Example]) -> list[float]:
    """V of the newest value of `chain` after each whole response: what ranks a prompt's samples
    into IS-DPO pairs when no reward is given."""
    from valuefn.scorer import ScoreItem, forward_values

    value = chain.links[-1][0]
    items = [ScoreItem(list(e.prompt_ids + e.response_ids), 0, len(e.prompt_ids)) for e in examples]
    return [float(v) for v in forward_values(value, items)] if items else []


def prompt_texts(records: Sequence[dict]) -> dict[str, str]:
    """{prompt group: the prompt's text} of rollout records, for scoring held-out samples with a
    reward (a record without prompt text scores on "")."""
    from trainer.rewards import record_prompt

    texts: dict[str, str] = {}
    for n, r in enumerate(records):
        group = str(r.get("prompt_id") if r.get("prompt_id") is not None else r.get("id", n))
        if group not in texts:
            try:
                texts[group] = record_prompt(r)
            except Exception:
                texts[group] = ""
    return texts


def distill_examples(records: Sequence[dict], method: str, value=None) -> tuple[list[Example], dict[str, int], str]:
    """(examples, skipped, ranked_by): the labelled rollouts with their reward; for IS-DPO/IS-IPO
    with a value and no labelled rollout at all, every rollout with the value's score instead
    (`ranked_by` says which: "reward" or "value")."""
    from trainer.value_trainer import examples_from_records

    examples, skipped = examples_from_records(records)
    if examples or method == "apa" or value is None or not skipped.get("unlabelled"):
        return examples, skipped, "reward"
    unlabelled, skipped = examples_from_records([{**r, "reward": 0.0} for r in records])
    scores = value_labels(value, unlabelled)
    return [dataclasses.replace(e, reward=v) for e, v in zip(unlabelled, scores)], skipped, "value"


@dataclass
class DistillResult:
    model: Any
    """The peft model (base + trained adapter)."""
    identity: dict
    config: DistillConfig
    training: dict[str, Any]
    metrics: dict[str, Any]
    history: list[float] = field(default_factory=list)


class DistillTrainer:
    """A LoRA adapter on the frozen base model, trained with APA or IS-DPO on labelled rollouts."""

    def __init__(self, config: DistillConfig, model_path: str | Path):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.config = config
        self.model_path = Path(model_path)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = default_device() if config.device == "auto" else torch.device(config.device)
        self.identity = backbone_identity(self.model_path)
        resolved = log_dtype("distill", config.dtype, self.device.type)
        self.config = config = config.model_copy(update={"dtype": resolved})  # recorded resolved
        dtype = getattr(torch, resolved)
        torch.manual_seed(config.seed)
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device)
        base.requires_grad_(False)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)  # adapters in float32 (peft's default autocast)
        self.token_advantages = False
        """APA per token (advantages from a value) or per response (a final reward only)."""
        self._tokenizer = None
        self._overuse_table: dict[tuple[int, int], float] | None = None
        """`bigram_overuse` of the training responses (with `overuse_weight`): the pair step weighs the
        answers' tokens by it."""
        self.model.train()

    # ------------------------------------------------------------------ forward passes
    def _logits(self, batch, *, reference: bool) -> torch.Tensor:
        B, L = batch.input_ids.shape
        position_ids = torch.arange(L, device=self.device).expand(B, L)
        kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
        if reference:
            with torch.no_grad(), self.model.disable_adapter():
                return self.model(**kw).logits  # (B, L, V)
        return self.model(**kw).logits

    def _forward(self, batch, mask: torch.Tensor):
        """The base's and the policy's log-probabilities of the batch's response tokens, per token (B, L)
        and summed (B,): ref_logp, ref_sum, logp, logp_sum; and the cover term, `cover_weight` x
        KL(base || policy) over the responses (0 when off: the base's (B, L, V) logits are then not
        kept past their log-probabilities)."""
        ref_logits = self._logits(batch, reference=True)
        ref_logp, ref_sum = sequence_logps(ref_logits, batch.input_ids, mask)
        if not self.config.cover_weight:
            ref_logits = None
        logits = self._logits(batch, reference=False)
        logp, logp_sum = sequence_logps(logits, batch.input_ids, mask)
        cover = 0.0 if ref_logits is None else self.config.cover_weight * cover_kl(logits, ref_logits, mask)
        return ref_logp, ref_sum, logp, logp_sum, cover

    @staticmethod
    def _response_mask(batch) -> torch.Tensor:
        """(B, L) 1 at the response tokens kept inside max_len."""
        L = batch.input_ids.shape[1]
        pos = torch.arange(L, device=batch.input_ids.device)[None, :]
        start = batch.prompt_lens[:, None]
        return ((pos >= start) & (pos < start + batch.kept[:, None])).float()

    def _apa_step(self, chunk: Sequence[Example], advantages: Sequence[Sequence[float]]) -> tuple[torch.Tensor, dict]:
        batch = collate(chunk, self.config.max_len).to(self.device)
        mask = self._response_mask(batch)  # (B, L)
        adv = torch.zeros_like(mask)  # (B, L): A_t at response position prompt_len + t
        for i, a in enumerate(advantages):
            p, k = int(batch.prompt_lens[i]), int(batch.kept[i])
            adv[i, p: p + k] = torch.tensor(a[:k], dtype=adv.dtype)
        ref_logp, ref_sum, logp, logp_sum, cover = self._forward(batch, mask)  # (B, L), (B,), (B, L), (B,), scalar
        if self.token_advantages:
            loss = apa_loss(logp, ref_logp, adv, mask, lam=self.config.lam)
        else:  # one advantage per response: adv holds it at every response token
            seq_adv = (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
            loss = apa_sequence_loss(logp_sum, ref_sum, seq_adv, lam=self.config.lam)
        return loss + cover, {"tokens": batch.tokens}

    def _pair_step(self, pairs: Sequence[tuple[Example, Example]]) -> tuple[torch.Tensor, dict]:
        seqs = [c for c, _ in pairs] + [r for _, r in pairs]  # chosen first, then rejected
        batch = collate(seqs, self.config.max_len).to(self.device)
        mask = self._response_mask(batch)
        ref_logp, ref, logp, pol, cover = self._forward(batch, mask)  # ref, pol: (2P,)
        P = len(pairs)
        if self._overuse_table is not None:  # over-used tokens count for less, in both answers
            weights = self._pair_token_weights(pairs, batch, mask)  # (2P, L)
            ref, pol = (ref_logp * weights).sum(-1), (logp * weights).sum(-1)
        out = is_daa_loss(pol[:P], pol[P:], ref[:P], ref[P:], beta=self.config.beta, clip_eps=self.config.clip_eps,
                          kind="ipo" if self.config.method == "is-ipo" else "dpo",
                          sft_weight=self.config.sft_weight, chosen_tokens=mask[:P].sum(-1))
        info = {"tokens": batch.tokens, "weight": float(out.weights.mean()),
                "accuracy": float((out.margins > 0).float().mean())}
        return out.loss + cover, info

    def _overuse(self, train_set: Sequence[Example], reference: Sequence[Example]) -> tuple[dict, dict]:
        """The over-used bigram table of the training responses against `reference`, and what the
        manifest records of it (the most over-used bigrams as text)."""
        table = bigram_overuse(train_set, reference)
        pen = [sum(row) for row in overuse_penalties(train_set, table)]
        held = held_bigrams(train_set)
        top = sorted(table, key=lambda g: -held[g] * (1 - math.exp(-table[g])))[:10]  # the most excess responses
        tok = self._tokenizer_()
        record = {"weight": self.config.overuse_weight, "bigrams": len(table), "reference_responses": len(reference),
                  "mean_penalty": self.config.overuse_weight * float(np.mean(pen)) if pen else 0.0,
                  "top": [{"text": tok.decode(list(g)), "responses": held[g], "log_ratio": round(table[g], 4)}
                          for g in top]}
        log.info("distill %s: %d over-used bigrams against %d base samples (weight x over-use per response: %.4f "
                 "on average); most: %s", self.config.method, len(table), len(reference), record["mean_penalty"],
                 ", ".join(f"{t['text']!r} x{math.exp(t['log_ratio']):.1f}" for t in record["top"][:5]))
        return table, record

    def _tokenizer_(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def _pair_token_weights(self, pairs: Sequence[tuple[Example, Example]], batch, mask: torch.Tensor) -> torch.Tensor:
        """(2P, L) weights of the response tokens in the log-ratios of the pairs' answers (chosen first): a
        token's credit is its pair's reward gap per token of its answer, g; `overuse_weight` x its over-use
        comes off it, down to none: weight max(0, 1 - w * o_t / g), the pair methods' counterpart of
        `overuse_advantages`. Both answers, because a stock phrase counted in the rejected answer alone
        is a shortcut: the policy widens every margin by saying it less, whatever the answer. The pair's
        importance weight counts the same tokens."""
        weights = mask.clone()
        answers = [c for c, _ in pairs] + [r for _, r in pairs]
        gaps = [c.reward - r.reward for c, r in pairs] * 2
        for i, (e, gap, pen) in enumerate(zip(answers, gaps, overuse_penalties(answers, self._overuse_table))):
            p, k = int(batch.prompt_lens[i]), int(batch.kept[i])
            o = torch.tensor(pen[:k], dtype=weights.dtype, device=weights.device)
            weights[i, p: p + k] = (1 - self.config.overuse_weight * o * max(1, len(e.response_ids)) / gap).clamp(min=0)
        return weights

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, units: Sequence, advantages: Sequence | None, eval_examples: Sequence[Example]) -> dict:
        """Held-out loss on `units` and KL(policy || base) per response token on the held-out rollouts
        `eval_examples` (each None when its input is empty)."""
        if not units and not eval_examples:
            return {}
        was = self.model.training
        self.model.eval()
        losses, kls, weights = [], [], []
        bs = self.config.eval_batch_size
        for i in range(0, len(units), bs):
            if self.config.method == "apa":
                loss, _ = self._apa_step(units[i: i + bs], advantages[i: i + bs])
            else:
                loss, _ = self._pair_step(units[i: i + bs])
            losses.append((float(loss), len(units[i: i + bs])))
        kl_bs = max(1, bs // 4)  # two vocabulary-wide logits tensors per sequence: keep the batch small
        for i in range(0, len(eval_examples), kl_bs):
            batch = collate(eval_examples[i: i + kl_bs], self.config.max_len).to(self.device)
            mask = self._response_mask(batch)
            kl = token_kl(self._logits(batch, reference=False), self._logits(batch, reference=True), mask)
            weights.append(float(mask.sum()))
            kls.append(float(kl) * weights[-1])
        self.model.train(was)
        return {"loss": sum(l * n for l, n in losses) / sum(n for _, n in losses) if losses else None,
                "kl_to_base": sum(kls) / max(1.0, sum(weights)) if weights else None}

    @torch.no_grad()
    def sample_responses(self, prompts: Sequence[tuple[tuple[int, ...], str]], *, adapter: bool) -> list[str]:
        """`eval_samples` plain samples (temperature `eval_temperature`, `eval_max_tokens`) per held-out
        prompt [(prompt_ids, prompt_text)], from the policy or (adapter=False) the base model; the
        same seeds every call, so the policy's checkpoints and the base are compared on equal draws.
        Prompts are left-padded into batches of `eval_batch_size`."""
        c = self.config
        tok = self._tokenizer_()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        was = self.model.training
        self.model.eval()
        torch.manual_seed(c.seed + 1)
        responses = []
        for i in range(0, len(prompts), c.eval_batch_size):
            chunk = prompts[i: i + c.eval_batch_size]
            L = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), L), pad, dtype=torch.long)  # (B, L), left-padded
            attention_mask = torch.zeros_like(input_ids)
            for j, (ids, _) in enumerate(chunk):
                input_ids[j, L - len(ids):] = torch.tensor(ids)
                attention_mask[j, L - len(ids):] = 1
            kw = dict(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                      do_sample=True, temperature=c.eval_temperature, top_p=1.0, top_k=0,
                      max_new_tokens=c.eval_max_tokens, num_return_sequences=c.eval_samples, pad_token_id=pad)
            if adapter:
                gen = self.model.generate(**kw)
            else:
                with self.model.disable_adapter():
                    gen = self.model.generate(**kw)
            responses += [tok.decode(row, skip_special_tokens=True) for row in gen[:, L:]]  # prompt-major order
        self.model.train(was)
        return responses

    def sample_metrics(self, prompts: Sequence[tuple[tuple[int, ...], str]], reward_fn: Callable | None, *,
                       adapter: bool) -> dict:
        """{"reward": mean reward (None without `reward_fn`), "distinct_2"} of `sample_responses`."""
        from trainer.evaluate import distinct_n

        responses = self.sample_responses(prompts, adapter=adapter)
        texts = [text for _, text in prompts for _ in range(self.config.eval_samples)]
        reward = float(np.mean(reward_fn(texts, responses))) if reward_fn is not None and responses else None
        return {"reward": reward, "distinct_2": distinct_n(responses)}

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        """A copy of the trained (LoRA) weights: a checkpoint held in memory."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def _load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for n, value in state.items():
            params[n].copy_(value)

    # ------------------------------------------------------------------ the loop
    def train(self, examples: Sequence[Example], *, value=None, reward_fn: Callable | None = None,
              prompt_texts: dict[str, str] | None = None, data: str | None = None,
              extra: dict | None = None, reference: Sequence[Example] | None = None) -> DistillResult:
        """Train on `examples` (minus `eval_fraction` of the prompts, held out for metrics), measuring
        a checkpoint every `eval_every` steps and at the end; stop once the KL to the base reaches
        `kl_budget`; keep the checkpoint `select` chooses (trainer/distill_checkpoints.py).
        `reference`: the base model's samples of the training prompts, which `overuse_weight` needs.

        Raises `NoEligibleCheckpoint` (a ValueError) when no checkpoint is inside the bounds and
        `on_none_eligible="refuse"`."""
        from tqdm.auto import tqdm

        c = self.config
        start_all = time.perf_counter()
        kept = [e for e in examples if len(e.prompt_ids) < c.max_len]
        train_set, eval_set = split_examples(kept, c.eval_fraction, c.seed)
        if not train_set:
            raise ValueError("no training examples (are the rollouts labelled? see `iro reward`)")
        if c.kl_budget is not None and not eval_set:
            raise ValueError("kl_budget needs held-out rollouts to measure the KL on (eval_fraction > 0 and "
                             "rollouts of at least two prompts)")
        self.token_advantages = value is not None
        table = self._overuse_table = overuse = None
        if c.overuse_weight:
            if not reference:
                raise ValueError("overuse_weight needs the base model's samples of the training prompts (reference "
                                 "rollouts) to tell which bigrams the training responses over-use")
            table, overuse = self._overuse(train_set, reference)
            self._overuse_table = table
            if not (c.method == "apa" and value is not None):  # the penalty comes off each response's reward
                train_set, eval_set = (overuse_rewards(xs, table, c.overuse_weight) for xs in (train_set, eval_set))
        if c.method == "apa":
            def advantages(xs):
                if value is None:
                    return [[a] * len(e.response_ids) for e, a in zip(xs, group_baseline_advantages(xs))]
                adv = value_advantages(value, xs, progress=c.progress)
                if table is None:
                    return adv
                return overuse_advantages(adv, overuse_penalties(xs, table), c.overuse_weight)
            train_units, eval_units = list(train_set), list(eval_set)
            train_adv, eval_adv = advantages(train_units), advantages(eval_units)
        else:
            train_units = make_pairs(train_set, c.pairs_per_prompt, c.min_reward_gap)
            eval_units = make_pairs(eval_set, c.pairs_per_prompt, c.min_reward_gap)
            train_adv = eval_adv = None
            if not train_units:
                raise ValueError("no preference pairs: IS-DPO needs several samples per prompt with different rewards"
                                 + (f" (at least min_reward_gap={c.min_reward_gap:g} apart)" if c.min_reward_gap else ""))

        steps_per_epoch = math.ceil(len(train_units) / c.batch_size)
        total = total_steps(len(train_units), c.batch_size, c.epochs, c.max_steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = Optimizer(params, lr=c.lr, weight_decay=c.weight_decay, total=total,
                              warmup=max(1, int(total * c.warmup_ratio)), max_grad_norm=c.max_grad_norm)
        before = self.evaluate(eval_units, eval_adv, eval_set)

        # held-out prompts to sample from (reward and distinct-2 of every checkpoint, and the base's once)
        prompts: dict[str, tuple] = {}
        if c.eval_samples:
            for e in eval_set:
                if e.group not in prompts and len(prompts) < c.eval_prompts:
                    prompts[e.group] = (e.prompt_ids, (prompt_texts or {}).get(e.group, ""))
        heldout_prompts = list(prompts.values())
        base_samples = self.sample_metrics(heldout_prompts, reward_fn, adapter=False) if heldout_prompts else None
        base_d2 = base_samples["distinct_2"] if base_samples else None
        if base_samples:
            log.info("distill %s: base on %d held-out prompts x %d: reward %s, distinct-2 %.4f (a checkpoint is "
                     "eligible down to %.4f)", c.method, len(heldout_prompts), c.eval_samples,
                     "-" if base_samples["reward"] is None else f"{base_samples['reward']:+.4f}", base_d2,
                     base_d2 * (1 - c.max_distinct_drop))
        checkpoints: list[Checkpoint] = []
        samples: list[dict | None] = []

        kl_trace: list[tuple[int, float]] = []  # every KL measured: (step, KL)

        def kl_now(step: int) -> float:
            kl = self.evaluate([], None, eval_set)["kl_to_base"]
            kl_trace.append((step, kl))
            return kl

        def measure(step: int, epoch: int, kl: float | None = None) -> Checkpoint:
            """A checkpoint: the KL (`kl` when just measured) and samples; the held-out loss only for the chosen one."""
            kl = kl_now(step) if kl is None else kl
            sm = self.sample_metrics(heldout_prompts, reward_fn, adapter=True) if heldout_prompts else None
            cp = Checkpoint(step, kl, sm and sm["reward"], sm and sm["distinct_2"], None, epoch,
                            state=self._adapter_state())
            checkpoints.append(cp)
            samples.append(sm)
            change = f" ({cp.distinct_2 / base_d2 - 1:+.1%} vs base)" if cp.distinct_2 is not None and base_d2 else ""
            log.info("distill %s: checkpoint at step %d: KL %.4f, reward %s, distinct-2 %s%s", c.method, step,
                     cp.kl_to_base, "-" if cp.reward is None else f"{cp.reward:+.4f}",
                     "-" if cp.distinct_2 is None else f"{cp.distinct_2:.4f}", change)
            return cp

        rng = random.Random(c.seed)
        history: list[float] = []
        tokens, seconds, step, epoch = 0, 0.0, 0, 0
        stopped: str | None = None
        bar = tqdm(total=total, desc=f"distill ({c.method})", unit="step", disable=not c.progress, dynamic_ncols=True)
        self.model.train()
        for epoch in range(c.epochs):
            order = list(range(len(train_units)))
            rng.shuffle(order)
            for b in range(0, len(order), c.batch_size):
                if step >= total or stopped:
                    break
                t0 = time.perf_counter()
                idx = order[b: b + c.batch_size]
                chunk = [train_units[i] for i in idx]
                if c.method == "apa":
                    loss, info = self._apa_step(chunk, [train_adv[i] for i in idx])
                else:
                    loss, info = self._pair_step(chunk)
                optimizer.step(loss)
                seconds += time.perf_counter() - t0
                tokens += info["tokens"]
                step += 1
                history.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4f}", tok_s=f"{tokens / seconds:.0f}")
                cp, midway = None, bool(eval_set) and step < total  # the end of training is measured below
                if midway and c.eval_every is not None and step % c.eval_every == 0:
                    cp = measure(step, epoch + 1)
                elif midway and c.kl_every is not None and step % c.kl_every == 0:
                    kl = kl_now(step)  # between checkpoints: one here only when the budget is reached
                    if kl >= c.kl_budget:
                        cp = measure(step, epoch + 1, kl)
                if cp is not None:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4f}", kl=f"{cp.kl_to_base:.4f}")
                    if c.kl_budget is not None and cp.kl_to_base >= c.kl_budget:
                        stopped = f"KL {cp.kl_to_base:.4f} reached the budget {c.kl_budget:g} at step {step}"
                        log.info("distill %s: %s: training stops", c.method, stopped)
            if step >= total or stopped:
                break
        bar.close()
        if eval_set and not stopped:
            measure(step, epoch + 1)  # the end of training

        metrics: dict[str, Any] = {"eval_before": before}
        window = max(1, min(steps_per_epoch, len(history) // 4))  # first vs last epoch (or quarter of the run)
        metrics["train_loss_first"] = float(np.mean(history[:window])) if history else None
        metrics["train_loss_last"] = float(np.mean(history[-window:])) if history else None
        if checkpoints:
            rule = c.select
            if rule == "reward" and (reward_fn is None or base_samples is None):
                rule = "kl"
                log.warning("distill %s: select=reward without a %s: the kl rule chooses the checkpoint", c.method,
                            "reward function" if reward_fn is None else "held-out sample (eval_prompts/eval_samples)")
            # `stop`: the budget stopped training; a checkpoint counts as inside it up to PPO's 1.5x
            slack = 1.0 if c.kl_rule == "bound" else STOP_SLACK
            choice = select_checkpoint(checkpoints, rule, kl_budget=c.kl_budget, max_distinct_drop=c.max_distinct_drop,
                                       base_distinct_2=base_d2, on_none_eligible=c.on_none_eligible, kl_slack=slack)
            if not choice.eligible:
                log.warning("distill %s: publishing step %d: %s", c.method, choice.step, choice.why)
            chosen = checkpoints[choice.index]
            self._load_adapter_state(chosen.state)
            chosen.loss = self.evaluate(eval_units, eval_adv, [])["loss"] if eval_units else None
            metrics["eval"] = {"loss": chosen.loss, "kl_to_base": chosen.kl_to_base}
            if base_samples is not None:
                sm = samples[choice.index]
                metrics["samples"] = {"distinct_2_policy": sm["distinct_2"], "distinct_2_base": base_d2,
                                      "samples": len(heldout_prompts) * c.eval_samples}
                if reward_fn is not None:
                    metrics["samples"] |= {"reward_policy": sm["reward"], "reward_base": base_samples["reward"],
                                           "reward_gain": sm["reward"] - base_samples["reward"]}
            metrics["selection"] = {
                "rule": choice.rule, "requested": c.select, "chosen_step": choice.step, "why": choice.why,
                "eligible": choice.eligible, "kl_budget": c.kl_budget, "kl_rule": c.kl_rule,
                "max_distinct_drop": c.max_distinct_drop, "stopped": stopped, "base": base_samples,
                "checkpoints": [cp.record(base_d2) for cp in checkpoints], "kl_trace": kl_trace}
        else:  # nothing held out: the end of training, unmeasured
            metrics["eval"] = {}
            metrics["selection"] = {"rule": "last", "requested": c.select, "chosen_step": step, "eligible": None,
                                    "why": "no held-out rollouts to measure checkpoints on (eval_fraction=0)",
                                    "kl_budget": c.kl_budget, "kl_rule": c.kl_rule,
                                    "max_distinct_drop": c.max_distinct_drop,
                                    "stopped": None, "base": None, "checkpoints": []}
        self.model.eval()
        training = {
            "kind": "policy", "method": c.method, "data": data, "config": c.to_dict(),
            "advantages": ("value" if value is not None else "group_baseline") if c.method == "apa" else None,
            "examples": {"train": len(train_set), "eval": len(eval_set), "units_train": len(train_units),
                         "units_eval": len(eval_units)},
            "overuse": overuse,
            "steps": step, "chosen_step": metrics["selection"]["chosen_step"], "tokens": tokens,
            "train_seconds": round(seconds, 3),
            "wall_seconds": round(time.perf_counter() - start_all, 3), "finished_at": time.time(), **(extra or {}),
        }
        return DistillResult(self.model, self.identity, c, training, metrics, history)

    def publish(self, result: DistillResult, registry: PolicyRegistry, name: str) -> int:
        """Publish the adapter as the next version of policy `name` (CURRENT follows)."""
        manifest = {"format_version": POLICY_FORMAT_VERSION, "name": name, "version": 1, "base": result.identity,
                    "method": result.config.method, "hyperparameters": result.config.hyperparameters(),
                    "lora_rank": result.config.lora_r, "training": result.training, "metrics": result.metrics}
        return registry.publish_adapter(
            name, lambda d: write_adapter_files(result.model, d, result.identity.get("name", "")), manifest)


__all__ = ["DistillResult", "DistillTrainer", "bigram_overuse", "distill_examples", "group_baseline_advantages",
           "make_pairs", "overuse_advantages", "overuse_penalties", "overuse_rewards", "prompt_texts",
           "value_advantages", "value_labels"]
