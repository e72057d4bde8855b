"""`iro bench --adapter`: what serving a distilled policy adapter costs.

Two real servers, one after the other (each alone on the machine):

    A  `iro serve`                          plain n=16 sampling of the base model (compiled engine)
    B  `iro serve --policies-dir REGISTRY`  the same through the base model's name and through the
                                            policy's name (a rank-16 LoRA adapter on q/k/v/o with
                                            small random weights, published into a temp registry)

Reported: `adapter_vs_plain_time_ratio` (B: policy / base, same server, same workload; target
<= 1.3, the issue's), its per-token twin, and base tok/s on A and on B
(`plain_with_registry_vs_without`: what configuring a registry, which turns LoRA on in vLLM and on
CPU turns graph compilation off, costs requests that do not use an adapter). Every request uses
`ignore_eos`, so all of them generate exactly max_tokens per sequence.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.guided import PROMPTS, _post_all, chat_body
from bench.server import start

POLICY = "bench-policy"
TARGETS = {"adapter_vs_plain_time_ratio": ("<=", 1.3)}


def publish_random_adapter(policies_dir: Path, model_path: Path, *, rank: int = 16, seed: int = 0) -> int:
    """A LoRA policy with small random weights (B ~ N(0, 0.02)), published like `iro distill` does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from valuefn.model import backbone_identity
    from registry.policies import POLICY_FORMAT_VERSION, PolicyRegistry, write_adapter_files

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                         "o_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    identity = backbone_identity(model_path)
    manifest = {"format_version": POLICY_FORMAT_VERSION, "name": POLICY, "version": 1, "method": "apa",
                "lora_rank": rank, "base": identity, "training": {"kind": "bench: random weights"}}
    return PolicyRegistry(policies_dir).publish_adapter(
        POLICY, lambda d: write_adapter_files(model, d, identity.get("name", "")), manifest)


def _plain(url: str, model: str, repeats: int) -> dict:
    """Median seconds of 16 prompts x n=16 (48 tokens each, ignore_eos) through `model`."""
    runs = []
    for _ in range(repeats):
        t, rs = asyncio.run(_post_all(url, [chat_body(model, p, n=16, ignore_eos=True) for p in PROMPTS]))
        runs.append((t, sum(r["usage"]["completion_tokens"] for r in rs)))
    runs.sort()
    t, tokens = runs[len(runs) // 2]
    return {"seconds": t, "tokens": tokens, "tok_per_s": tokens / t}


def _warm(url: str, model: str) -> None:
    asyncio.run(_post_all(url, [chat_body(model, PROMPTS[0], max_tokens=8, n=4)]))


def run(json_path: Path | None = None, dtype: str = "bfloat16", repeats: int = 3) -> dict:
    from bench.guided import evaluate_targets_of
    from common.model_store import prepare_default_model

    model_path = prepare_default_model()
    results: dict = {"settings": {"prompts": len(PROMPTS), "n": 16, "max_tokens": chat_body("m", "")["max_tokens"],
                                  "ignore_eos": True, "repeats": repeats, "dtype": dtype, "lora_rank": 16}}
    with tempfile.TemporaryDirectory(prefix="iro-bench-adapter-") as tmp:
        work = Path(tmp)
        srv = start(work / "plain", env={"IRO_DTYPE": dtype})
        results["engine_start_seconds_no_registry"] = srv.started_in
        try:
            base = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
            _warm(srv.url, base)
            plain = _plain(srv.url, base, repeats)
        finally:
            srv.stop()
        publish_random_adapter(work / "policies", model_path)
        srv = start(work / "lora", env={"IRO_DTYPE": dtype}, args=["--policies-dir", str(work / "policies")])
        results["engine_start_seconds_with_registry"] = srv.started_in
        try:
            models = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
            if POLICY not in models:
                raise RuntimeError(f"the server does not serve {POLICY}: {models}")
            _warm(srv.url, base)
            _warm(srv.url, POLICY)
            t0 = time.perf_counter()
            with_registry = _plain(srv.url, base, repeats)
            adapter = _plain(srv.url, POLICY, repeats)
            results["lora_measure_seconds"] = time.perf_counter() - t0
        finally:
            srv.stop()
    results.update({
        "plain_tok_per_s_no_registry": plain["tok_per_s"], "plain_seconds_no_registry": plain["seconds"],
        "plain_tok_per_s_with_registry": with_registry["tok_per_s"],
        "plain_seconds_with_registry": with_registry["seconds"],
        "adapter_tok_per_s": adapter["tok_per_s"], "adapter_seconds": adapter["seconds"],
        "adapter_vs_plain_time_ratio": adapter["seconds"] / with_registry["seconds"],
        "adapter_vs_plain_per_token_ratio": with_registry["tok_per_s"] / adapter["tok_per_s"],
        "adapter_vs_plain_no_registry_time_ratio": adapter["seconds"] / plain["seconds"],
        "plain_with_registry_vs_without": with_registry["seconds"] / plain["seconds"],
    })
    results["machine"] = machine()
    results["targets"] = evaluate_targets_of(results, TARGETS)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
    return results


def machine() -> dict:
    """CPU model and the instruction-set flags that matter for bf16 on CPU."""
    import os
    import platform

    info = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "avx_vnni")))
                break
    except OSError:
        pass
    return info


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", "target", "met", title="iro bench --adapter")
    for k, t in results["targets"].items():
        table.add_row(k, f"{t['value']:.3g}", f"{t['op']} {t['target']}", "yes" if t["met"] else "NO")
    for k in ("adapter_vs_plain_per_token_ratio", "adapter_vs_plain_no_registry_time_ratio",
              "plain_with_registry_vs_without", "plain_tok_per_s_no_registry", "plain_tok_per_s_with_registry",
              "adapter_tok_per_s", "engine_start_seconds_no_registry", "engine_start_seconds_with_registry"):
        table.add_row(k, f"{results[k]:.3g}", "", "")
    Console().print(table)


__all__ = ["machine", "publish_random_adapter", "print_table", "run"]
