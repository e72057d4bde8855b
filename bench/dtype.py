"""bf16 against float32 on this machine: engine sampling, value scoring and value training.

Each part runs in both dtypes and writes its figures into one JSON (default
bench/results/dtype-<cpu>.json), with the CPU model, its bf16 flags and the dtype `auto` picks:

    flock /tmp/iro-e2e.lock python -m bench.dtype engine --dtype bfloat16   # starts a real server
    flock /tmp/iro-e2e.lock python -m bench.dtype engine --dtype float32
    python -m bench.dtype scorer     # value scorer, both dtypes (no engine)
    python -m bench.dtype train      # a few value-training steps, both dtypes (no engine)

`engine` measures plain n=16 sampling and guided CBS (LoRA value and engine value) on the
16 bench prompts, and the concurrency figures of `iro bench` (bench.guided) with two sequential
requests of each kind. `scorer` and `train` alternate the dtypes for `--rounds` rounds and keep
each dtype's best round, so load from other processes weighs on both alike; every part records
the load average around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    from common.dtype import CPU_BF16_FLAGS, _read_cpuinfo, machine_dtype, parse_cpuinfo

    model, flags = parse_cpuinfo(_read_cpuinfo())
    choice = machine_dtype()
    import os

    return {"cpu": model, "cpus": os.cpu_count(), "bf16_flags": sorted(f for f in flags if f in CPU_BF16_FLAGS),
            "avx512f": "avx512f" in flags, "amx_tile": "amx_tile" in flags,
            "auto": choice.dtype, "auto_reason": choice.reason}


def default_path() -> Path:
    cpu = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", machine()["cpu"].lower())).strip("-")
    return RESULTS / f"dtype-{cpu}.json"


def measure_engine(dtype: str, concurrency: bool = True) -> dict:
    """Plain and guided sampling on a real server in `dtype` (run under the e2e lock); with
    `concurrency`, also the sequential requests of the concurrency figures."""
    import httpx

    from bench.guided import engine_value_config, GUIDANCE, PROMPTS, _post_all, chat_body, measure_concurrency, measure_plain_vs_guided
    from bench.server import start
    from common.model_store import prepare_default_model
    from valuefn.loader import init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry

    model_path = prepare_default_model()
    with tempfile.TemporaryDirectory(prefix="iro-dtype-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "values")
        init_value(registry, "bench", model_path, ValueModelConfig(num_layers=4, dtype=dtype))
        init_value(registry, "bench-head", model_path, engine_value_config(model_path, dtype))
        srv = start(work, env={"IRO_DTYPE": dtype}, wait=600)
        try:
            model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
            asyncio.run(_post_all(srv.url, [chat_body(model, PROMPTS[0], max_tokens=8),
                                            chat_body(model, PROMPTS[1], max_tokens=8, guidance=GUIDANCE)]))
            out = {"engine_start_seconds": srv.started_in}
            out.update(measure_plain_vs_guided(srv.url, model))
            if concurrency:
                out.update(measure_concurrency(srv.url, model, 2, out["guided_seconds"], out["plain_seconds"],
                                               out["guided_engine_value_seconds"]))
            log_text = srv.log_path.read_text(errors="replace")
            out["server_dtype_log"] = next((line.split("serve: ", 1)[1] for line in log_text.splitlines()
                                            if "serve: dtype" in line), None)
        finally:
            srv.stop()
    keep = ("engine_start_seconds", "plain_seconds", "plain_tok_per_s", "guided_seconds", "guided_tok_per_s",
            "guided_engine_value_seconds", "guided_vs_plain_time_ratio", "guided_engine_value_vs_plain_time_ratio",
            "concurrency_speedup", "plain_concurrency_speedup", "engine_value_concurrency_speedup",
            "concurrency_vs_plain_ceiling", "concurrency_vs_plain_ceiling_lora", "server_dtype_log")
    return {k: out[k] for k in keep if k in out}


def measure_scorer(dtype: str) -> dict:
    """The value scorer (4-layer value, one search of w*k = 16 candidates) in `dtype` (bench.scorer)."""
    from bench.scorer import run

    rows = run("cpu", dtype, ["smollm2-135m-4l"], [1], repeats=1)["rows"]
    return {f"searches_{r['searches']}": {"kv_mean_ms_per_step": r["kv_mean_ms"],
                                          "candidates_per_s": r["candidates"] / (r["kv_mean_ms"] / 1000)}
            for r in rows}


def measure_training(dtype: str, steps: int = 6, batch_size: int = 16, preset: str = "full-lora") -> dict:
    """Value training tokens/s: `steps` steps of the 4-layer LoRA value (`full-lora`; the engine
    value of `full` trains a head on features computed once, so its time is the feature pass) on
    synthetic rollouts (96-token prompts, 48-token responses; the token ids do not change the cost)."""
    import random

    from common.model_store import prepare_default_model
    from trainer.value_config import ValueTrainConfig
    from trainer.value_trainer import Example, ValueTrainer

    rng = random.Random(0)
    examples = [Example(tuple(rng.randrange(100, 40000) for _ in range(96)),
                        tuple(rng.randrange(100, 40000) for _ in range(48)), rng.random(), f"p{i // 4}")
                for i in range(steps * batch_size)]
    config = ValueTrainConfig.from_preset(preset, epochs=1, max_steps=steps, batch_size=batch_size, eval_fraction=0,
                                          progress=False, **{"model.dtype": dtype})
    trainer = ValueTrainer(config, prepare_default_model())
    t0 = time.perf_counter()
    result = trainer.train(examples)
    return {"steps": result.training["steps"], "tokens": result.training["tokens"],
            "tokens_per_second": result.training["tokens_per_second"], "wall_seconds": time.perf_counter() - t0,
            "recorded_dtype": result.training["dtype"], "preset": preset}


BEST = {"scorer": lambda f: f["searches_1"]["candidates_per_s"], "train": lambda f: f["tokens_per_second"]}
"""The figure a round is judged by (higher is better)."""


def loaded(measure, dtype: str) -> dict:
    import os

    before = os.getloadavg()[0]
    figures = measure(dtype)
    return {**figures, "load_avg_1min": [round(before, 2), round(os.getloadavg()[0], 2)]}


def update(path: Path, part: str, dtype: str, figures: dict) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["machine"] = machine()
    data.setdefault(part, {})[dtype] = {**figures, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["engine", "scorer", "train"])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], nargs="*", default=["bfloat16", "float32"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="scorer/train: alternating rounds (best kept)")
    parser.add_argument("--no-concurrency", action="store_true", help="engine: skip the sequential requests")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: stop the server on the way out
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    path = args.json or default_path()
    measure = {"engine": lambda d: measure_engine(d, not args.no_concurrency), "scorer": measure_scorer,
               "train": measure_training}[args.part]
    rounds = 1 if args.part == "engine" else args.rounds
    best: dict[str, dict] = {}
    for r in range(rounds):
        for dtype in args.dtype:
            figures = loaded(measure, dtype)
            print(dtype, f"round {r + 1}", json.dumps(figures, indent=1))
            if dtype not in best or (args.part in BEST and BEST[args.part](figures) > BEST[args.part](best[dtype])):
                best[dtype] = figures
            update(path, args.part, dtype, {**best[dtype], "rounds": r + 1})
    print("wrote", path)


if __name__ == "__main__":
    main()
