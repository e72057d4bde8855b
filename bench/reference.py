"""A faithful per-prompt re-implementation of the reference IRO search loop (Hugging Face).

What the published code does, one prompt at a time: w*k rows decoded token by token with a KV
cache; every `l` tokens the value model re-scores the *full* sequences (prompt + response, no
cache); the top `w` rows survive and each is repeated `k` times (the KV cache is re-indexed the
same way). Same base model, same value model and settings as our server, for `iro bench`.
"""

from __future__ import annotations

import time

import torch

from valuefn.scorer import LoadedValue, ScoreItem, forward_values


@torch.inference_mode()
def reference_cbs(model, value: LoadedValue, prompt_ids: list[int], *, w: int, k: int, l: int, max_new_tokens: int,
                  temperature: float, eos_token_id: int, generator: torch.Generator) -> dict:
    rows = w * k
    seqs = torch.tensor([prompt_ids] * rows)
    finished = torch.zeros(rows, dtype=torch.bool)
    out = model(input_ids=seqs, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    value_seconds = 0.0
    generated = 0
    while generated < max_new_tokens and not bool(finished.all()):
        for _ in range(min(l, max_new_tokens - generated)):
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            generated += 1
        t0 = time.perf_counter()
        scores = forward_values(value, [ScoreItem(s.tolist(), 0, len(prompt_ids)) for s in seqs], use_cache=False)
        value_seconds += time.perf_counter() - t0
        top = torch.topk(torch.as_tensor(scores), w).indices
        keep = top.repeat_interleave(k)  # each survivor repeated k times
        seqs, finished, logits = seqs[keep], finished[keep], logits[keep]
        past.reorder_cache(keep)
    best = int(torch.topk(torch.as_tensor(scores), 1).indices[0])
    return {"token_ids": seqs[best, len(prompt_ids):].tolist(), "value_seconds": value_seconds,
            "candidate_tokens": rows * generated}


def load_reference_model(model_path, threads: int | None = None, dtype: str = "bfloat16"):
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype)).eval()
