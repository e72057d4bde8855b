"""The GPU check a user runs in one command (`iro doctor --smoke`): the real server under each vLLM
runner configuration, with the default (engine) value and a LoRA value, and a table to send us.

For each configuration (V2, vLLM's GPU default; V1 eager; V1 compiled, i.e. with CUDA graphs; V1
compiled with tensor parallel 2 where two GPUs are present) it starts `iro serve` with the embedded
model and checks:
- where the default engine value is computed (`engine` when a guided Best-of-N request makes no
  scorer pass, else `scorer`), and how far the engine's values are from the Hugging Face scorer's
  (`/v1/score` of the same answers);
- that a LoRA value guides a CBS request (always the scorer);
- a hot swap of the engine value under 4 guided clients: seconds until served, failed requests.
On a machine without CUDA only the V1 rows run (V2 needs Triton's GPU backend), which is how this
script itself is tested here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def configurations(cuda: bool, gpus: int) -> list[tuple[str, dict, list[str], str | None]]:
    """(name, environment, iro serve flags, why skipped or None)."""
    no_gpu = None if cuda else "needs a CUDA GPU"
    rows = [("V2 (GPU default)", {"VLLM_USE_V2_MODEL_RUNNER": "1"}, [], None if cuda else "V2 needs Triton's GPU backend"),
            ("V1 eager", {"VLLM_USE_V2_MODEL_RUNNER": "0"}, ["--enforce-eager"], None),
            ("V1 compiled (CUDA graphs on GPU)", {"VLLM_USE_V2_MODEL_RUNNER": "0"}, [], None),
            ("V1 compiled, TP=2", {"VLLM_USE_V2_MODEL_RUNNER": "0"}, ["--tensor-parallel-size", "2"],
             no_gpu or (None if gpus >= 2 else "needs 2 GPUs"))]
    return rows


def _scorer_passes(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("iro_scorer_batch_size_count"))


def _wait_serving(http: httpx.Client, name: str, version: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = {v["name"]: v for v in http.get("/v1/values").json()["data"]}
        if data.get(name, {}).get("serving_version") == version:
            return
        time.sleep(0.05)  # polling the server's state with a deadline
    raise RuntimeError(f"{name} v{version} not served after {timeout}s: {data.get(name)}")


def _model_id(http: httpx.Client) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def check_engine_value(http: httpx.Client, model: str, name: str) -> dict:
    """Where the value is computed and the largest |engine - HF scorer| over the answers."""
    before = _scorer_passes(http)
    r = http.post("/v1/chat/completions", json={
        "model": f"{model}+{name}", "messages": MESSAGES, "max_tokens": 8, "temperature": 0.9, "n": 2, "seed": 11,
        "guidance": {"mode": "bon", "k": 6}})
    r.raise_for_status()
    body = r.json()
    where = "engine" if _scorer_passes(http) == before else "scorer"
    pairs = [(c["message"]["content"], s) for c, s in zip(body["choices"], body["guidance"]["scores"])
             if c["finish_reason"] == "length"]
    diff = None
    if pairs:
        s = http.post("/v1/score", json={"value": name, "messages": MESSAGES, "responses": [t for t, _ in pairs]})
        s.raise_for_status()
        diff = max(abs(e - h) for (_, e), h in zip(pairs, s.json()["scores"]))
    return {"engine_value": where, "engine_vs_hf_max_abs": diff}


def check_lora_value(http: httpx.Client, model: str, name: str) -> dict:
    before = _scorer_passes(http)
    r = http.post("/v1/chat/completions", json={
        "model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0.8,
        "guidance": {"value": name, "mode": "cbs", "w": 2, "k": 2, "l": 8}})
    ok = r.status_code == 200
    return {"lora_value": ("scorer" if _scorer_passes(http) > before else "engine?") if ok else f"HTTP {r.status_code}"}


def run_configuration(env: dict, args: list[str], workdir: Path) -> dict:
    from bench.guided import measure_hot_swap
    from bench.server import start
    from common.engine_args import default_value_layers
    from common.model_store import prepare_default_model
    from valuefn.loader import init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry

    model_path = prepare_default_model()
    layers = json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"]
    head = ValueModelConfig.for_engine_value(value_layers=list(default_value_layers(layers)))
    srv = start(workdir, env=env, args=args, wait=900)
    try:
        registry = Registry(srv.values_dir)
        with httpx.Client(base_url=srv.url, timeout=600) as http:
            model = _model_id(http)
            _wait_serving(http, "smoke-head", init_value(registry, "smoke-head", model_path, head, seed=3))
            _wait_serving(http, "smoke-lora", init_value(registry, "smoke-lora", model_path,
                                                         ValueModelConfig(num_layers=2)))
            row = {"start_seconds": round(srv.started_in, 1), **check_engine_value(http, model, "smoke-head"),
                   **check_lora_value(http, model, "smoke-lora")}
        swap = measure_hot_swap(srv.url, model, srv.values_dir, model_path, head, clients=4, name="smoke-head",
                                guidance={"value": "smoke-head", "mode": "cbs", "w": 2, "k": 2, "l": 8})
        row.update(hot_swap_seconds=round(swap["hot_swap_seconds"], 3),
                   failed_during_swap=swap["failed_requests_during_swap"])
        runner = [line for line in srv.log_path.read_text(errors="replace").splitlines() if "engine values:" in line]
        row["server_says"] = runner[-1].split("engine values:", 1)[1].strip() if runner else "?"
        return row
    finally:
        srv.stop()


def table(rows: list[dict]) -> str:
    cols = ["configuration", "engine_value", "engine_vs_hf_max_abs", "lora_value", "hot_swap_seconds",
            "failed_during_swap", "start_seconds", "server_says"]
    fmt = lambda v: f"{v:.2e}" if isinstance(v, float) and v < 1 else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    import logging

    import torch

    from server.doctor import collect, format_text

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll of /health otherwise
    cuda = torch.cuda.is_available()
    rows = []
    for name, env, args, skip in configurations(cuda, torch.cuda.device_count() if cuda else 0):
        if skip:
            rows.append({"configuration": name, "engine_value": f"skipped: {skip}"})
            continue
        print(f"-- {name}: starting the server ...", file=sys.stderr, flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="iro-smoke-") as tmp:
                rows.append({"configuration": name, **run_configuration(env, args, Path(tmp))})
        except Exception as exc:  # noqa: BLE001 - one failing configuration is a row, not the end of the check
            rows.append({"configuration": name, "engine_value": f"FAILED: {type(exc).__name__}: {exc}"[:300]})
    failed = any(str(r.get("engine_value", "")).startswith("FAILED") or r.get("failed_during_swap") for r in rows)
    if as_json:
        print(json.dumps({"doctor": collect(), "rows": rows}, indent=2))
    else:
        print(format_text(collect()))
        print()
        print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main("--json" in sys.argv))
