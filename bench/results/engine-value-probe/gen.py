"""Probe study data: base-model samples on review-sentiment, rewards, per-layer hidden states."""
import sys, time, torch, numpy as np; torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
from transformers import AutoTokenizer, AutoModelForCausalLM
from trainer.tasks.review_sentiment import prompts
from trainer.rewards import sentiment
from common.model_store import *  # noqa
import common.model_store as ms
path = "/root/.cache/iro/models/SmolLM2-135M-Instruct"
import os
if not os.path.isdir(path):
    path = str(next(p for p in __import__("pathlib").Path.home().joinpath(".cache/iro/models").iterdir()))
tok = AutoTokenizer.from_pretrained(path); tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
torch.manual_seed(0)
def run(split, n, k):
    items = prompts(split, n)
    texts = [tok.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=True) for it in items]
    recs = []
    for i in range(0, len(texts), 50):
        batch = [t for t in texts[i:i+50] for _ in range(k)]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=0.7, max_new_tokens=32, pad_token_id=tok.pad_token_id)
        P = enc.input_ids.shape[1]
        for j, b in enumerate(batch):
            plen = int(enc.attention_mask[j].sum())
            resp = out[j, P:].tolist()
            # cut at eos (im_end id 2)
            if tok.eos_token_id in resp:
                resp = resp[:resp.index(tok.eos_token_id) + 1]
            recs.append(dict(prompt_ids=enc.input_ids[j, P - plen:].tolist(), resp_ids=resp, prompt_idx=i // 1 + j // k, text=tok.decode(resp, skip_special_tokens=True), prompt=b))
        print(split, i, time.strftime("%X"), flush=True)
    rewards = sentiment([r["prompt"] for r in recs], [r["text"] for r in recs])
    for r, x in zip(recs, rewards): r["reward"] = x
    return recs
t0 = time.time()
train = run("train", 400, 2); ev = run("eval", 64, 4)
print("gen s", time.time() - t0)
torch.save(dict(train=train, eval=ev), "/work/probe/data.pt")
