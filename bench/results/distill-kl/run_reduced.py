"""Reduced-scale measurement of `iro distill`'s KL budget and checkpoint selection (issue 28, item 6).

STATUS: prepared, NOT run to completion. Its one trial here (16 prompts, IS-DPO, seed 0) was
OOM-killed after 28 minutes at 5.5 GB RSS on the shared 2-core, 23 GB machine (other engineers'
jobs left ~2 GB free; the IS-DPO step holds several (16, ~100, 49152) float32 logits tensors).
It has produced no figures; see README.md in this folder.

No guided rollouts of a trained value were on disk (bench/results/, /tmp, ~/.cache/iro hold none),
and the shared 2-core machine could not run `iro loop --preset full` (a server and three iterations)
plus six distillations in the time available. What this runs instead, on the real base model
(SmolLM2-135M-Instruct), in-process:

1. plain base rollouts on review-sentiment's training prompts (chat template, temperature 0.7,
   32 tokens, `--samples` per prompt), labelled with the task's reward (VADER sentiment);
2. `DistillTrainer` with the `full` preset of each method and its new defaults (select=reward,
   max_distinct_drop=0.10, the method's kl_budget) on 3 seeds; scale overrides are listed in the
   result file (fewer prompts and steps, eval_every scaled down; APA without a value, so the
   response-level loss, with its lambda set here, since the preset's 0.01 is for per-token
   advantages from a value).

The reference gain is not IRO-3's (there is no trained value): it is the oracle Best-of-N by reward
over the same base rollouts (mean over prompts of the best sample's reward minus the mean reward),
i.e. what the training data can teach. Run from the repository root:

    PYTHONPATH=. nice -n 10 .venv/bin/python bench/results/distill-kl/run_reduced.py --out bench/results/distill-kl
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch


def base_rollouts(model_path, n_prompts: int, samples: int, max_tokens: int, temperature: float, seed: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.rewards import sentiment
    from trainer.tasks.review_sentiment import prompts
    from trainer.value_trainer import Example

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    items = prompts("train", n_prompts)
    encoded = [tuple(tok.apply_chat_template(it["messages"], add_generation_prompt=True, tokenize=True)["input_ids"])
               for it in items]
    texts = {it["id"]: it["messages"][-1]["content"] for it in items}
    torch.manual_seed(seed)
    examples = []
    bs = 8
    for i in range(0, len(items), bs):
        chunk = list(zip(items[i: i + bs], encoded[i: i + bs]))
        L = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), L), eos, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for j, (_, ids) in enumerate(chunk):
            input_ids[j, L - len(ids):] = torch.tensor(ids)
            mask[j, L - len(ids):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=1.0, top_k=0, max_new_tokens=max_tokens, num_return_sequences=samples,
                                 pad_token_id=eos)
        rows = gen[:, L:].tolist()
        for n, row in enumerate(rows):
            item, ids = chunk[n // samples]
            response = row[: row.index(eos) + 1] if eos in row else row
            examples.append((item["id"], ids, tuple(response), tok.decode(response, skip_special_tokens=True)))
    rewards = sentiment([texts[g] for g, *_ in examples], [r for *_, r in examples])
    return [Example(ids, resp, float(w), g) for (g, ids, resp, _), w in zip(examples, rewards)], texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["is-dpo", "apa"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from common.model_store import resolve_model
    from trainer.distill import DistillTrainer
    from trainer.distill_config import DistillConfig
    from trainer.rewards import sentiment

    torch.set_num_threads(args.threads)
    model_path = resolve_model(None)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    examples, texts = base_rollouts(model_path, args.prompts, args.samples, 32, 0.7, seed=1234)
    rollout_seconds = time.perf_counter() - t0
    by_prompt: dict[str, list[float]] = {}
    for e in examples:
        by_prompt.setdefault(e.group, []).append(e.reward)
    base_mean = float(np.mean([e.reward for e in examples]))
    oracle_gain = float(np.mean([max(v) for v in by_prompt.values()])) - base_mean
    scale = {  # the reduced scale: what differs from the `full` preset
        "common": {"eval_fraction": 0.2, "eval_prompts": 19, "eval_samples": 2, "threads": args.threads,
                   "progress": False, "device": "cpu"},
        "is-dpo": {"pairs_per_prompt": 2, "epochs": 3, "eval_every": 6},
        "apa": {"lam": 0.5, "epochs": 2, "eval_every": 8},
    }
    out = {"machine": subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True,
                                     text=True).stdout.strip(), "python": platform.python_version(),
           "model": str(model_path), "rollouts": {"prompts": args.prompts, "samples": args.samples, "max_tokens": 32,
                                                  "temperature": 0.7, "policy": "base (plain sampling)",
                                                  "seconds": round(rollout_seconds, 1)},
           "base_mean_reward": base_mean, "oracle_bon_gain": oracle_gain,
           "reference": f"oracle Best-of-{args.samples} by reward over the base rollouts (not IRO-3)",
           "scale_overrides": scale, "runs": []}
    for method in args.methods:
        for seed in args.seeds:
            config = DistillConfig.from_preset("full", method=method, seed=seed, **scale["common"], **scale[method])
            start = time.perf_counter()
            trainer = DistillTrainer(config, model_path)
            result = trainer.train(examples, reward_fn=sentiment, prompt_texts=texts)
            m, sel = result.metrics, result.metrics["selection"]
            samples = m["samples"]
            run = {"method": method, "seed": seed, "steps": result.training["steps"],
                   "chosen_step": sel["chosen_step"], "rule": sel["rule"], "why": sel["why"],
                   "eligible": sel["eligible"], "stopped": sel["stopped"], "kl_budget": config.kl_budget,
                   "kl_to_base": m["eval"]["kl_to_base"], "reward_policy": samples["reward_policy"],
                   "reward_base": samples["reward_base"], "reward_gain": samples["reward_gain"],
                   "share_of_reference_gain": samples["reward_gain"] / oracle_gain,
                   "distinct_2_policy": samples["distinct_2_policy"], "distinct_2_base": samples["distinct_2_base"],
                   "distinct_2_vs_base": samples["distinct_2_policy"] / samples["distinct_2_base"] - 1,
                   "checkpoints": sel["checkpoints"], "config": config.to_dict(),
                   "wall_seconds": round(time.perf_counter() - start, 1),
                   "train_seconds": result.training["train_seconds"]}
            out["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("checkpoints", "config")}), flush=True)
            (args.out / "reduced.json").write_text(json.dumps(out, indent=2))
            del trainer, result


if __name__ == "__main__":
    main()
