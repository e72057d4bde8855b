"""Issue 15's other engine-value candidates on the same data as trainer_probe.py: a small MLP head
instead of the linear one, and the sampler's own features (the sampled token's logprob and the
entropy of the distribution it was drawn from) next to the layer features. Same ValueTrainer, same
preset options; only the head (or its inputs) changes.

usage: python head_probe.py [threads] [runs: JSON list of [name, hidden, sampler features, seed]]
(data: gen.py -> /work/probe/data.pt)
"""
import json, sys, time

import torch
from torch import nn

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
sys.path.insert(0, "/work/main")
from transformers import AutoModelForCausalLM  # noqa: E402

from trainer.value_config import ValueTrainConfig  # noqa: E402
from trainer.value_trainer import Example, ValueTrainer, batches, collate  # noqa: E402
from valuefn.loader import BackbonePool  # noqa: E402

PATH = "/root/.cache/iro/models/SmolLM2-135M-Instruct"
BASE = {"engine_head": True, "engine_layers": "2,15,27", "epochs": 10, "lr": 0.001}


class MLPHead(nn.Module):
    """x -> out(gelu(fc(x))); `weight`/`bias` are the output layer's (what the trainer initialises)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.in_features = d
        self.fc, self.out = nn.Linear(d, hidden), nn.Linear(hidden, 1)

    weight = property(lambda self: self.out.weight)
    bias = property(lambda self: self.out.bias)

    def forward(self, x):
        return self.out(nn.functional.gelu(self.fc(x)))


@torch.inference_mode()
def sampler_features(examples, max_len: int) -> dict:
    """Per example and position t: [log p(x_{t+1} | x_<=t) / 5, entropy_t / 5] of the base model at
    temperature 1 (what the engine's sampler holds when it samples position t's token)."""
    lm = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    out = {}
    for chunk in batches(examples, 32, None):
        batch = collate(chunk, max_len)
        logp = lm(batch.input_ids, attention_mask=batch.attention_mask).logits.float().log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, L)
        nxt = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, -1:]], dim=1)
        chosen = logp.gather(-1, nxt[..., None])[..., 0]
        chosen[:, -1] = 0.0  # the last position sampled nothing we know
        for i, e in enumerate(chunk):
            n = int(batch.attention_mask[i].sum())
            out[e] = torch.stack([chosen[i, :n] / 5, entropy[i, :n] / 5], dim=-1)
    return out


def main():
    d = torch.load("/work/probe/data.pt")

    def ex(recs, tag):
        return [Example(tuple(r["prompt_ids"]), tuple(r["resp_ids"]), float(r["reward"]), f"{tag}{r['prompt_idx']}")
                for r in recs]

    train, ev = ex(d["train"], "t"), ex(d["eval"], "e")
    pool = BackbonePool(PATH, torch.device("cpu"))
    extra = None
    runs = [("linear (today's default)", 0, False, 0), ("MLP 256", 256, False, 0), ("MLP 1024", 1024, False, 0),
            ("linear + sampler features", 0, True, 0), ("MLP 256 + sampler features", 256, True, 0)]
    for name, hidden, with_sampler, seed in (json.loads(sys.argv[2]) if len(sys.argv) > 2 else runs):
        t0 = time.time()
        cfg = ValueTrainConfig.from_preset("full", progress=False, eval_fraction=0.0, seed=seed, **BASE)
        tr = ValueTrainer(cfg, PATH, pool=pool)
        torch.manual_seed(seed)
        d_in = tr.model.head.in_features + (2 if with_sampler else 0)
        if hidden:
            tr.model.head = MLPHead(d_in, hidden)
        elif with_sampler:
            tr.model.head = nn.Linear(d_in, 1)
        if with_sampler:
            if extra is None:
                extra = sampler_features(train + ev, cfg.max_len)
            cache = tr._cache_features

            def cache_with_sampler(examples, cache=cache, tr=tr):
                cache(examples)
                tr._features = {e: torch.cat([f, extra[e]], dim=-1) for e, f in tr._features.items()}

            tr._cache_features = cache_with_sampler
        tr.train(train)
        tr._cache_features(ev)  # training dropped its cache; the held-out set's, through the same path
        m = tr.evaluate(ev)
        params = sum(p.numel() for p in tr.model.head.parameters())
        print(json.dumps({"head": name, "head_parameters": params, "seed": seed, **BASE}),
              f"spearman {m['spearman']:.3f} pair_same {m['pair_acc_same_prompt']:.3f} mse {m['final_mse']:.4f}"
              f" s {time.time() - t0:.0f}", flush=True)


if __name__ == "__main__":
    main()
