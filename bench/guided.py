"""`iro bench`: guided decoding performance on this machine, in one run.

Starts a real server (vLLM + default model + one value), then measures:
guided_vs_plain_time_ratio (a 4-layer LoRA value, scored by the scorer) and
guided_engine_value_vs_plain_time_ratio (an engine value, computed by the engine while it
samples), speedup_vs_reference_loop, scoring_growth_ratio,
concurrency_speedup (LoRA value) and concurrency_vs_plain_ceiling (the engine-side value's gain from
16 guided requests in flight over one at a time, against plain sampling's gain at the same load),
hot_swap_seconds (the default engine value) and hot_swap_lora_value_seconds, each under 16 clients
guided by that value, with failed_requests_during_swap over both, and peak RSS. Everything runs in
one dtype, the machine's choice unless given (`common.dtype`), reported with its reason.

The plain/guided rounds also run PF and DVTS (engine value, 16 samples per step as CBS) and read
each arm's CPU core-seconds over the server's process tree: `cost` has every arm's wall and CPU
seconds per generated token, `cost_ratios` PF's and DVTS's over CBS's (medians of the rounds'
ratios; CPU time is what the shared machine's drift moves least). `iro bench --cost` runs only those.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict

from bench.server import peak_rss_mib, start
from common.search_settings import SearchOverrides, SearchSettings

TOPICS = ["the ocean", "a busy city", "learning to cook", "winter mornings", "an old library", "space travel",
          "a mountain hike", "friendship", "a rainy day", "jazz music", "the history of bread", "a small garden",
          "electric cars", "a night market", "chess", "autumn leaves"]
PROMPTS = [f"Write a long, detailed paragraph about {t}." for t in TOPICS]
TARGETS = {"guided_vs_plain_time_ratio": ("<=", 1.3), "guided_engine_value_vs_plain_time_ratio": ("<=", 1.2),
           "speedup_vs_reference_loop": (">=", 4.0), "speedup_vs_reference_loop_engine_value": (">=", 6.0),
           "scoring_growth_ratio": ("<=", 1.5), "concurrency_speedup": (">=", 4.0),
           "concurrency_vs_plain_ceiling": (">=", 0.95),
           "hot_swap_seconds": ("<", 0.5), "hot_swap_lora_value_seconds": ("<", 1.0),
           "failed_requests_during_swap": ("<=", 0)}
"""The LoRA value's targets are the first wave's; the engine value's (the default) are issue 15's."""
SEARCH = SearchSettings(mode="cbs", w=4, k=4, l=8)
"""The bench's search: IRO's reference CBS."""
W, K, L, MAX_TOKENS, TEMPERATURE = SEARCH.w, SEARCH.k, SEARCH.l, 48, 0.7
GUIDANCE = {"value": "bench", **SearchOverrides(mode=SEARCH.mode, w=W, k=K, l=L).given()}
HEAD_GUIDANCE = GUIDANCE | {"value": "bench-head"}  # the default engine value: the engine computes it (no scorer)
ENGINE_VALUE_GUIDANCE = HEAD_GUIDANCE
"""The bench's engine-side value (the default engine value): `concurrency_vs_plain_ceiling` is its."""
PF_GUIDANCE = {"value": "bench-head", **SearchOverrides(mode="pf", k=W * K, l=L).given()}
DVTS_GUIDANCE = {"value": "bench-head", **SearchOverrides(mode="dvts", s=W, w=1, k=K, l=L).given()}
"""PF and DVTS at CBS's samples per step (16): 16 particles; 4 subtrees of one beam with 4 successors."""


class Target(BaseModel):
    op: str
    target: float
    value: float
    met: bool


class BenchReport(BaseModel):
    """Schema of `iro bench --json` (extra detail fields are allowed)."""

    model_config = ConfigDict(extra="allow")

    guided_vs_plain_time_ratio: float
    guided_engine_value_vs_plain_time_ratio: float
    speedup_vs_reference_loop: float
    speedup_vs_reference_loop_engine_value: float
    scoring_growth_ratio: float
    concurrency_speedup: float
    concurrency_vs_plain_ceiling: float
    """Engine-side value: (16 guided requests in flight / one at a time) over the same gain of plain
    n=16 sampling (the engine's own ceiling at that load); 1.0 means guidance costs no concurrency."""
    hot_swap_seconds: float
    """The default (engine) value: publish -> served, under 16 clients it guides."""
    hot_swap_lora_value_seconds: float
    failed_requests_during_swap: int
    peak_rss_mib: float
    base_model_mib: float
    machine: dict
    settings: dict
    targets: dict[str, Target]


def evaluate_targets(results: dict) -> dict:
    return evaluate_targets_of(results, TARGETS)


def evaluate_targets_of(results: dict, targets: dict[str, tuple[str, float]]) -> dict:
    ops = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__}
    return {k: {"op": op, "target": t, "value": results[k], "met": bool(ops[op](float(results[k]), float(t)))}
            for k, (op, t) in targets.items()}


def chat_body(model: str, prompt: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": TEMPERATURE, **kw}


async def _post_all(url: str, bodies: list[dict]) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[http.post("/v1/chat/completions", json=b) for b in bodies])
        elapsed = time.perf_counter() - t0
    for r in rs:
        r.raise_for_status()
    return elapsed, [r.json() for r in rs]


ARMS: dict[str, dict] = {"plain": {"n": W * K}, "cbs_lora": {"guidance": GUIDANCE},
                         "cbs": {"guidance": HEAD_GUIDANCE}, "pf": {"guidance": PF_GUIDANCE},
                         "dvts": {"guidance": DVTS_GUIDANCE}}
"""What each arm adds to a prompt's request: plain n=16 sampling; CBS guided by the LoRA value
(`cbs_lora`) and by the engine value (`cbs`); PF and DVTS guided by the engine value."""
COST_ARMS = ("plain", "cbs", "pf", "dvts")
"""`iro bench --cost`: the per-token cost of each search mode, one value (the engine value)."""


def measure_plain_vs_guided(url: str, model: str, rounds: int = 1, *,
                            arms: tuple[str, ...] = ("plain", "cbs_lora", "cbs"), pid: int | None = None,
                            prompts: list[str] = PROMPTS) -> dict:
    """The prompts through each of `arms` (`ARMS`), all of a round's requests in flight together,
    arm after arm, `rounds` times. The ratios are the medians of each round's own ratios (this
    machine's speed drifts by tens of percent over minutes: a ratio within one round compares like
    with like); the seconds are medians too, and every round's figures are kept (`*_rounds`).

    With `pid` (the server's), each arm's CPU core-seconds are read too, summed over the server's
    process tree (`process_tree_cpu`: the API process, the engine core and its workers), and every
    arm gets its wall and CPU seconds per generated token (`usage.completion_tokens`, every candidate
    counted) in `cost`, with the ratios to CBS in `cost_ratios` (`cost_figures`)."""
    from bench.server import cpu_spent, process_tree_cpu

    bodies = {a: [chat_body(model, p, **ARMS[a]) for p in prompts] for a in arms}
    runs: list[dict[str, dict]] = []
    for _ in range(rounds):
        this: dict[str, dict] = {}
        for arm, batch in bodies.items():
            before = process_tree_cpu(pid) if pid else None
            seconds, answers = asyncio.run(_post_all(url, batch))
            this[arm] = {"seconds": seconds, "tokens": sum(r["usage"]["completion_tokens"] for r in answers),
                         "chunks": sum((r.get("guidance") or {}).get("chunks", 0) for r in answers)}
            if pid:
                this[arm]["cpu"] = cpu_spent(before, process_tree_cpu(pid))
        runs.append(this)
    out = {"rounds": rounds, "arms": list(arms), "prompts": len(prompts), **cost_figures(runs)}
    seconds = {a: [r[a]["seconds"] for r in runs] for a in arms}
    tokens = {a: runs[-1][a]["tokens"] for a in arms}
    med = {a: statistics.median(ts) for a, ts in seconds.items()}
    old = {"plain": "plain", "cbs_lora": "guided", "cbs": "guided_engine_value"}  # the report's names before arms
    for arm, name in old.items():
        if arm in arms:
            out |= {f"{name}_seconds": med[arm], f"{name}_candidate_tokens": tokens[arm],
                    f"{name}_seconds_rounds": seconds[arm]}
    if "plain" in arms:
        out["plain_tok_per_s"] = tokens["plain"] / med["plain"]
    if {"plain", "cbs_lora"} <= set(arms):
        out |= {"guided_tok_per_s": tokens["cbs_lora"] / med["cbs_lora"],
                "guided_vs_plain_time_ratio": statistics.median(
                    [g / p for g, p in zip(seconds["cbs_lora"], seconds["plain"])]),
                "guided_vs_plain_per_token_ratio": out["cost_ratios"]["cbs_lora_vs_plain_wall_per_token"],
                "guided_chunks": runs[-1]["cbs_lora"]["chunks"]}
    if {"plain", "cbs"} <= set(arms):
        head_ratios = [h / p for h, p in zip(seconds["cbs"], seconds["plain"])]
        out |= {"guided_engine_value_vs_plain_time_ratio": statistics.median(head_ratios),
                "guided_engine_value_vs_plain_time_ratio_rounds": head_ratios}
    return out


def cost_figures(runs: list[dict[str, dict]], base: str = "cbs") -> dict:
    """Per generated token, each arm's wall seconds and (where measured) CPU core-seconds, medians of
    the rounds; and each search's ratios to `base` (CBS's, with both CBS arms' to plain), each the
    median of the rounds' own ratios. `runs`: per round, per arm {"seconds", "tokens", "cpu": `cpu_spent`}.

    >>> r = lambda s, c, t: {"seconds": s, "tokens": t, "cpu": {"total": c}}
    >>> f = cost_figures([{"cbs": r(2, 4, 100), "pf": r(2, 3, 100)}, {"cbs": r(4, 4, 100), "pf": r(2, 2, 100)}])
    >>> f["cost_ratios"]["pf_vs_cbs_cpu_per_token"], f["cost_ratios"]["pf_vs_cbs_wall_per_token"]
    (0.625, 0.75)
    >>> f["cost"]["pf"]["cpu_core_seconds_per_token"]
    0.025
    """
    arms = list(runs[0]) if runs else []
    cpu = all("cpu" in r[a] for r in runs for a in arms)

    def per_token(r: dict, what: str) -> float:
        return (r["cpu"]["total"] if what == "cpu" else r["seconds"]) / max(1, r["tokens"])

    cost = {}
    for a in arms:
        cost[a] = {"tokens_rounds": [r[a]["tokens"] for r in runs], "seconds_rounds": [r[a]["seconds"] for r in runs],
                   "wall_seconds_per_token": statistics.median(per_token(r[a], "wall") for r in runs)}
        if cpu:
            cost[a] |= {"cpu_core_seconds_rounds": [r[a]["cpu"]["total"] for r in runs],
                        "cpu_core_seconds_per_token": statistics.median(per_token(r[a], "cpu") for r in runs),
                        "cpu_core_seconds_by_process": {
                            role: statistics.median(r[a]["cpu"].get(role, 0.0) for r in runs)
                            for role in dict.fromkeys(k for r in runs for k in r[a]["cpu"])
                            if role not in ("total", "ended")}}
    pairs = [(a, base) for a in arms if a not in (base, "plain", "cbs_lora") and base in arms]
    pairs += [(a, "plain") for a in (base, "cbs_lora") if a in arms and "plain" in arms]
    ratios = {}
    for a, b in pairs:
        for what in ("wall", "cpu") if cpu else ("wall",):
            ratios[f"{a}_vs_{b}_{what}_per_token"] = statistics.median(
                per_token(r[a], what) / per_token(r[b], what) for r in runs)
            ratios[f"{a}_vs_{b}_{what}_per_token_rounds"] = [per_token(r[a], what) / per_token(r[b], what)
                                                              for r in runs]
    return {"cost": cost, "cost_ratios": ratios}


def engine_value_config(model_path, dtype: str):
    """The default engine value (`iro values init`): a head on the layers an engine exposes by default."""
    from common.engine_args import default_value_layers
    from valuefn.model import ValueModelConfig, backbone_identity

    layers = default_value_layers(backbone_identity(model_path)["total_layers"])
    return ValueModelConfig.for_engine_value(value_layers=list(layers), dtype=dtype)


def measure_concurrency(url: str, model: str, sequential: int, concurrent_seconds: float,
                        plain_concurrent_seconds: float, engine_value_concurrent_seconds: float) -> dict:
    """Guided requests one at a time vs 16 in flight (the `*_concurrent_seconds` of 16 requests,
    from `measure_plain_vs_guided`); and the same for plain n=16 sampling: a guided request alone
    already keeps w*k = 16 sequences in the engine, so the engine's own gain from 16 to 256
    sequences (`plain_concurrency_speedup`) is the ceiling for a guided figure.
    `concurrency_vs_plain_ceiling` is the engine-side value's gain over that ceiling."""
    seq_t = plain_seq_t = engine_seq_t = 0.0
    for p in PROMPTS[:sequential]:
        t, _ = asyncio.run(_post_all(url, [chat_body(model, p, guidance=GUIDANCE)]))
        seq_t += t
        t, _ = asyncio.run(_post_all(url, [chat_body(model, p, guidance=ENGINE_VALUE_GUIDANCE)]))
        engine_seq_t += t
        t, _ = asyncio.run(_post_all(url, [chat_body(model, p, n=W * K)]))
        plain_seq_t += t
    return concurrency_figures(sequential, len(PROMPTS), seq_t=seq_t, conc_t=concurrent_seconds,
                               plain_seq_t=plain_seq_t, plain_conc_t=plain_concurrent_seconds,
                               engine_seq_t=engine_seq_t, engine_conc_t=engine_value_concurrent_seconds)


def concurrency_figures(sequential: int, concurrent: int, *, seq_t: float, conc_t: float, plain_seq_t: float,
                        plain_conc_t: float, engine_seq_t: float, engine_conc_t: float) -> dict:
    """Requests/s one at a time (`sequential` requests in `*_seq_t` s) and in flight (`concurrent` in
    `*_conc_t` s) for the LoRA value, plain sampling and the engine-side value; their gains.

    >>> f = concurrency_figures(2, 16, seq_t=2.0, conc_t=4.0, plain_seq_t=1.0, plain_conc_t=2.0,
    ...                         engine_seq_t=1.0, engine_conc_t=2.5)
    >>> f["plain_concurrency_speedup"], f["engine_value_concurrency_speedup"], f["concurrency_vs_plain_ceiling"]
    (4.0, 3.2, 0.8)
    """
    def speedup(seq_seconds: float, conc_seconds: float) -> float:
        return (concurrent / conc_seconds) / (sequential / seq_seconds)

    plain = speedup(plain_seq_t, plain_conc_t)
    lora, engine = speedup(seq_t, conc_t), speedup(engine_seq_t, engine_conc_t)
    return {"sequential_seconds_per_request": seq_t / sequential, "concurrent_requests_per_s": concurrent / conc_t,
            "sequential_requests_per_s": sequential / seq_t, "concurrency_speedup": lora,
            "plain_sequential_seconds_per_request": plain_seq_t / sequential,
            "plain_concurrency_speedup": plain,
            "engine_value_sequential_seconds_per_request": engine_seq_t / sequential,
            "engine_value_concurrency_speedup": engine,
            "concurrency_vs_plain_ceiling": engine / plain,
            "concurrency_vs_plain_ceiling_lora": lora / plain}


def measure_hot_swap(url: str, model: str, values_dir: Path, model_path: Path, config, clients: int = 16, *,
                     name: str = "bench", guidance: dict = GUIDANCE) -> dict:
    """Publish a new version of the value `name` (`config`: its architecture, as a trainer would
    publish) while `clients` send requests guided by it (`guidance`); seconds until the server
    serves the new version."""
    from valuefn.loader import init_value
    from valuefn.registry import Registry

    failures, done = [], []
    stop = asyncio.Event()

    async def client(i: int, http: httpx.AsyncClient):
        while not stop.is_set():
            r = await http.post("/v1/chat/completions", json=chat_body(model, PROMPTS[i % 16], max_tokens=16,
                                                                       guidance={**guidance, "w": 2, "k": 2}))
            (done if r.status_code == 200 else failures).append(r.status_code)

    async def serving_version(http) -> int | None:
        data = (await http.get("/v1/values")).json()["data"]
        return next((v["serving_version"] for v in data if v["name"] == name), None)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            tasks = [asyncio.create_task(client(i, http)) for i in range(clients)]
            while len(done) < clients:  # load established
                await asyncio.sleep(0.05)
            version = await asyncio.to_thread(init_value, Registry(values_dir), name, model_path, config)
            published = time.perf_counter()
            while await serving_version(http) != version:
                await asyncio.sleep(0.01)
            swap = time.perf_counter() - published
            n_before = len(done)
            while len(done) < n_before + clients:  # keep load on after the swap
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)
            return swap

    swap = asyncio.run(main())
    return {"hot_swap_seconds": swap, "failed_requests_during_swap": len(failures),
            "requests_during_swap_test": len(done) + len(failures)}


def measure_scoring_growth(value, prompt_ids: list[int], repeats: int = 3) -> dict:
    """Scorer time per chunk along one 48-token CBS response (16 candidates per step)."""
    from valuefn.scorer import ScoreItem, forward_values

    rng = np.random.default_rng(0)
    per_step = []
    for r in range(repeats):
        value.cache.clear()
        beams = [[] for _ in range(W)]
        times = []
        for step in range(MAX_TOKENS // L):
            parents = [b for b in beams for _ in range(K)]
            cands = [p + list(rng.integers(100, 40000, L)) for p in parents]
            items = [ScoreItem(prompt_ids + c, len(prompt_ids) + len(p), len(prompt_ids)) for c, p in zip(cands, parents)]
            t0 = time.perf_counter()
            scores = forward_values(value, items)
            times.append(time.perf_counter() - t0)
            beams = [cands[i] for i in np.argsort(-scores)[:W]]
        per_step.append(times)
    med = [statistics.median(x) for x in zip(*per_step)]
    return {"scoring_step_seconds": med, "scoring_growth_ratio": med[-1] / med[0]}


def measure_reference(model_path: Path, value, tokenizer, prompts: list[str], threads: int,
                      dtype: str = "bfloat16") -> dict:
    import torch

    from bench.reference import load_reference_model, reference_cbs

    model = load_reference_model(model_path, threads, dtype)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    value_s = 0.0
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        out = reference_cbs(model, value, tokenizer.encode(ids, add_special_tokens=False), w=W, k=K, l=L,
                            max_new_tokens=MAX_TOKENS, temperature=TEMPERATURE, eos_token_id=tokenizer.eos_token_id,
                            generator=gen)
        value_s += out["value_seconds"]
    elapsed = time.perf_counter() - t0
    return {"reference_seconds_per_prompt": elapsed / len(prompts), "reference_value_fraction": value_s / elapsed}


def warm_up(url: str, model: str, arms: tuple[str, ...]) -> None:
    """One short request per arm, so every measured path is compiled and cached before it is timed."""
    asyncio.run(_post_all(url, [chat_body(model, PROMPTS[i], max_tokens=8, **ARMS[a]) for i, a in enumerate(arms)]))


def machine() -> dict:
    """The CPU (lscpu's model name), cores and platform, and the load averages now: this machine
    is shared, so a report says what else ran."""
    import os
    import subprocess

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        model = platform.processor()
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "processor": platform.processor(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def run_cost(rounds: int = 3, prompts: int = len(PROMPTS), json_path: Path | None = None, dtype: str = "auto") -> dict:
    """`iro bench --cost`: only the per-token cost of each search mode (`COST_ARMS`: plain n=16,
    CBS, PF and DVTS guided by the default engine value, 16 samples per step each), `rounds` rounds
    of the first `prompts` prompts, with every arm's CPU core-seconds summed over the server's
    process tree. Reports the machine and its load averages before and after (it may be shared)."""
    import logging
    import os

    from common.dtype import describe_dtype
    from common.model_store import prepare_default_model
    from valuefn.loader import init_value
    from valuefn.registry import Registry

    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_path = prepare_default_model()
    choice = describe_dtype(dtype)
    results: dict = {"machine": machine(),
                     "settings": {"w": W, "k": K, "l": L, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE,
                                  "prompts": prompts, "rounds": rounds, "dtype": choice.dtype,
                                  "dtype_reason": choice.reason,
                                  "arms": {a: ARMS[a] for a in COST_ARMS}}}
    with tempfile.TemporaryDirectory(prefix="iro-bench-cost-") as tmp:
        work = Path(tmp)
        init_value(Registry(work / "values"), "bench-head", model_path, engine_value_config(model_path, choice.dtype))
        srv = start(work, env={"IRO_DTYPE": choice.dtype}, ready=False)
        try:
            srv.wait_healthy(900)  # a shared machine may take minutes
            results["engine_start_seconds"] = srv.started_in
            model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
            warm_up(srv.url, model, COST_ARMS)
            t0 = time.perf_counter()
            results.update(measure_plain_vs_guided(srv.url, model, rounds=rounds, arms=COST_ARMS, pid=srv.proc.pid,
                                                   prompts=PROMPTS[:prompts]))
            results["measured_seconds"] = time.perf_counter() - t0
        finally:
            srv.stop_group()
    results["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
    return results


def print_cost_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("arm", "tokens / round", "wall s / token", "CPU core-s / token", "CPU by process (median s / round)",
                  title=f"iro bench --cost ({results['rounds']} rounds, {results['prompts']} prompts)")
    for arm, c in results["cost"].items():
        table.add_row(arm, f"{statistics.median(c['tokens_rounds']):.0f}", f"{c['wall_seconds_per_token']:.3g}",
                      f"{c.get('cpu_core_seconds_per_token', float('nan')):.3g}",
                      ", ".join(f"{k} {v:.3g}" for k, v in c.get("cpu_core_seconds_by_process", {}).items()))
    Console().print(table)
    ratios = Table("ratio (median of rounds)", "value", "rounds")
    for k, v in results["cost_ratios"].items():
        if not k.endswith("_rounds"):
            ratios.add_row(k, f"{v:.3f}", ", ".join(f"{x:.3f}" for x in results["cost_ratios"][k + "_rounds"]))
    Console().print(ratios)


def run(quick: bool = False, json_path: Path | None = None, dtype: str = "auto", rounds: int | None = None) -> dict:
    """One run of every measurement. `dtype` is the engine's, the values' and the reference loop's;
    "auto": the machine's choice (float32 on CPUs without native bf16, e.g. AVX2-only ones, where
    bf16 matmuls are emulated)."""
    import torch
    from transformers import AutoTokenizer

    from common.dtype import describe_dtype
    from common.model_store import prepare_default_model
    from valuefn.loader import BackbonePool, ValueLoader, init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry

    from tqdm import tqdm

    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_path = prepare_default_model()
    choice = describe_dtype(dtype)
    logging.getLogger(__name__).info("iro bench: %s", choice)
    dtype = choice.dtype
    steps = tqdm(total=8, desc="iro bench", unit="stage")
    results: dict = {"machine": machine(),
                     "settings": {"w": W, "k": K, "l": L, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE,
                                  "prompts": len(PROMPTS), "quick": quick, "dtype": dtype,
                                  "dtype_reason": choice.reason}}
    with tempfile.TemporaryDirectory(prefix="iro-bench-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "values")
        config = ValueModelConfig(num_layers=4, dtype=dtype)
        init_value(registry, "bench", model_path, config)
        init_value(registry, "bench-head", model_path, engine_value_config(model_path, dtype))
        srv = start(work, env={"IRO_DTYPE": dtype})
        results["engine_start_seconds"] = srv.started_in
        steps.update()
        try:
            model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
            warm_up(srv.url, model, tuple(ARMS))
            results.update(measure_plain_vs_guided(srv.url, model, rounds=rounds or (3 if quick else 5),
                                                   arms=tuple(ARMS), pid=srv.proc.pid))
            steps.update()
            results.update(measure_concurrency(srv.url, model, 2 if quick else 4, results["guided_seconds"],
                                               results["plain_seconds"], results["guided_engine_value_seconds"]))
            steps.update()
            swap = measure_hot_swap(srv.url, model, srv.values_dir, model_path,  # the default value
                                    engine_value_config(model_path, dtype), name="bench-head", guidance=HEAD_GUIDANCE)
            lora_swap = measure_hot_swap(srv.url, model, srv.values_dir, model_path, config)
            results.update(swap, hot_swap_lora_value_seconds=lora_swap["hot_swap_seconds"],
                           failed_requests_during_swap=swap["failed_requests_during_swap"]
                           + lora_swap["failed_requests_during_swap"],
                           requests_during_swap_test=swap["requests_during_swap_test"]
                           + lora_swap["requests_during_swap_test"])
            steps.update()
            results["peak_rss_mib"] = peak_rss_mib(srv.proc.pid)
            results["peak_rss_api_process_mib"] = peak_rss_mib(srv.proc.pid, children=False)
        finally:
            srv.stop()
        results["base_model_mib"] = sum(f.stat().st_size for f in model_path.glob("*.safetensors")) / 2**20
        # in-process parts run with the engine stopped, so they get the whole machine like ours did
        torch.set_num_threads(__import__("os").cpu_count() or 1)
        pool = BackbonePool(model_path)
        value = ValueLoader(registry, pool, dtype=dtype).load_version("bench", registry.current("bench"))
        tok = AutoTokenizer.from_pretrained(str(model_path))
        prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                                        add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)
        results.update(measure_scoring_growth(value, prompt_ids))
        steps.update()
        ref = measure_reference(model_path, value, tok, PROMPTS[: 2 if quick else 4], threads=None, dtype=dtype)
        results.update(ref)
        ours_per_prompt = results["guided_seconds"] / len(PROMPTS)
        results["ours_seconds_per_prompt"] = ours_per_prompt
        results["speedup_vs_reference_loop"] = ref["reference_seconds_per_prompt"] / ours_per_prompt
        steps.update()
        # the same comparison with the engine value: the reference re-runs it (the whole base
        # model + head) over every full sequence each chunk; we get it from the engine's forward
        head_value = ValueLoader(registry, pool, dtype=dtype).load_version("bench-head", registry.current("bench-head"))
        ref_head = measure_reference(model_path, head_value, tok, PROMPTS[:2], threads=None, dtype=dtype)
        results["reference_engine_value_seconds_per_prompt"] = ref_head["reference_seconds_per_prompt"]
        results["reference_engine_value_value_fraction"] = ref_head["reference_value_fraction"]
        results["ours_engine_value_seconds_per_prompt"] = results["guided_engine_value_seconds"] / len(PROMPTS)
        results["speedup_vs_reference_loop_engine_value"] = (ref_head["reference_seconds_per_prompt"]
                                                            / results["ours_engine_value_seconds_per_prompt"])
        steps.update()
    steps.update()
    steps.close()
    results["targets"] = evaluate_targets(results)
    BenchReport.model_validate(results)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
    return results


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", "target", "met", title="iro bench")
    for k, t in results["targets"].items():
        table.add_row(k, f"{t['value']:.3g}", f"{t['op']} {t['target']}", "yes" if t["met"] else "NO")
    for k in ("plain_seconds", "guided_seconds", "guided_engine_value_seconds", "plain_tok_per_s", "guided_tok_per_s", "plain_concurrency_speedup",
              "engine_value_concurrency_speedup", "concurrency_vs_plain_ceiling_lora",
              "reference_seconds_per_prompt",
              "ours_seconds_per_prompt", "reference_value_fraction", "reference_engine_value_seconds_per_prompt",
              "ours_engine_value_seconds_per_prompt", "peak_rss_mib", "peak_rss_api_process_mib",
              "base_model_mib", "engine_start_seconds"):
        if k in results:
            table.add_row(k, f"{results[k]:.3g}", "", "")
    Console().print(table)
    if results.get("cost"):
        print_cost_table(results)
    settings = results.get("settings", {})
    if "dtype" in settings:
        Console().print(f"dtype {settings['dtype']} ({settings.get('dtype_reason', '')})")
