"""Held-out Spearman of value architectures trained by the real ValueTrainer on base-model samples."""
import sys, time, json, torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
sys.path.insert(0, "/work/main")
from trainer.value_config import ValueTrainConfig
from trainer.value_trainer import ValueTrainer, Example
from valuefn.loader import BackbonePool
d = torch.load("/work/probe/data.pt")
def ex(recs, tag):
    return [Example(tuple(r["prompt_ids"]), tuple(r["resp_ids"]), float(r["reward"]), f"{tag}{r['prompt_idx']}") for r in recs]
train, ev = ex(d["train"], "t"), ex(d["eval"], "e")
path = "/root/.cache/iro/models/SmolLM2-135M-Instruct"
pool = BackbonePool(path, torch.device("cpu"))
runs = json.loads(sys.argv[1])
for opts in runs:
    t0 = time.time()
    cfg = ValueTrainConfig.from_preset("full", progress=False, eval_fraction=0.0, **opts)
    tr = ValueTrainer(cfg, path, pool=pool)
    res = tr.train(train)
    m = tr.evaluate(ev)
    print(json.dumps(opts), f"spearman {m['spearman']:.3f} pair_same {m['pair_acc_same_prompt']:.3f} mse {m['final_mse']:.4f} s {time.time()-t0:.0f}", flush=True)
