"""Deadlines honoured: guided requests with `guidance.deadline_ms` from concurrent openai-SDK clients.

    python -m bench.deadlines --requests 50 --clients 8 --deadline-ms 1500 --max-tokens 64 \\
        --out-dir bench/results/deadlines

Starts `iro serve` with an untrained value (as `iro values init`; or sends to `--url`), then
`--clients` clients share `--requests` chat requests, each a search (the modes of `--modes` in
turn, `--samples-per-step` samples per step, chunks of `--l` tokens, no end-of-sequence token:
an answer runs until the deadline stops it) with the same `deadline_ms`. Per request it records the response time seen by the
client, the search's own `guidance.elapsed_ms`, its steps and one chunk's time (elapsed / steps:
one step extends every candidate by one chunk), `finish_reason` and `guidance.stopped_by`, after an
untimed warm-up wave of `--clients` requests.
The search checks its deadline before each step and lets the step in flight finish, so the claim
under test is: response time <= deadline + one chunk's time. The report gives the
distributions (p50/p90/p99/max) of the overrun (response time - deadline) and of the chunk
time, and how many requests came back within that bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain in detail how bread is made.",
           "Describe a walk through a busy market.", "Write a letter to a friend about your summer.",
           "Explain how a bicycle works, step by step.", "Describe the sea in winter."]
NO_EOS = {"0": -100, "2": -100}
"""The default model's (SmolLM2) end-of-sequence tokens: no answer ends before the deadline does."""
MODES = ("cbs", "pf", "dvts")


def guidance(mode: str, samples: int, l: int) -> dict:
    """`mode` with `samples` samples per step and chunks of `l` tokens, its widths as the server
    plans them from a budget (k stays 4 where it fits: CBS 4 beams x 4, DVTS 4 subtrees of one
    beam x 4 and PF 16 particles for 16).

    >>> guidance("cbs", 16, 8), guidance("dvts", 8, 4)
    ({'mode': 'cbs', 'l': 8, 'k': 4, 'w': 4}, {'mode': 'dvts', 'l': 4, 'w': 1, 'k': 4, 's': 2})
    """
    from server.guided import plan_widths

    return {"mode": mode, "l": l, **plan_widths(mode, samples, {}, 4)}


def quantiles(xs: list[float]) -> dict:
    """p50/p90/p99/max (and min, mean) of `xs`, rounded to the millisecond.

    >>> quantiles([0.1, 0.2, 0.3, 0.4])["p50"], quantiles([])["n"]
    (0.25, 0)
    """
    if not xs:
        return {"n": 0}
    a = np.asarray(xs, dtype=float)
    q = {"min": a.min(), "mean": a.mean(), **{f"p{p}": np.percentile(a, p) for p in (50, 90, 99)}, "max": a.max()}
    return {"n": len(xs)} | {k: round(float(v), 3) for k, v in q.items()}


def record(mode: str, deadline_ms: int, response_s: float, body: dict) -> dict:
    """One request's figures from its response time and JSON body.

    >>> r = record("cbs", 1000, 1.4, {"choices": [{"finish_reason": "length", "message": {"content": "x"}}],
    ...     "guidance": {"elapsed_ms": 1300.0, "steps": 4, "stopped_by": "deadline", "tokens": 512}})
    >>> r["overrun_s"], r["chunk_s"], r["within_bound"], r["search_overrun_s"]
    (0.4, 0.325, False, 0.3)
    """
    g = body.get("guidance") or {}
    steps = g.get("steps") or 0
    elapsed_s = (g.get("elapsed_ms") or 0.0) / 1000
    chunk_s = elapsed_s / steps if steps else None
    deadline_s = deadline_ms / 1000
    return {"mode": mode, "response_s": round(response_s, 4), "deadline_s": deadline_s,
            "overrun_s": round(response_s - deadline_s, 4), "search_elapsed_s": round(elapsed_s, 4),
            "search_overrun_s": round(elapsed_s - deadline_s, 4), "steps": steps,
            "chunk_s": round(chunk_s, 4) if chunk_s is not None else None,
            "within_bound": chunk_s is not None and response_s <= deadline_s + chunk_s,
            "finish_reason": [c["finish_reason"] for c in body.get("choices", [])],
            "stopped_by": g.get("stopped_by"), "tokens": g.get("tokens"),
            "answer_chars": sum(len((c.get("message") or {}).get("content") or "") for c in body.get("choices", [])),
            "load_1min": round(os.getloadavg()[0], 2)}


async def send_all(url: str, model: str, *, requests: int, clients: int, deadline_ms: int, max_tokens: int,
                   searches: dict[str, dict], api_key: str = "none") -> list[dict]:
    """`requests` guided requests, `clients` in flight at once (each client sends its next when the
    last one came back), with the openai SDK."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    out: list[dict] = []
    modes = list(searches)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            mode = modes[i % len(modes)]
            t0 = time.perf_counter()
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=max_tokens,
                temperature=0.8, seed=i, logit_bias=NO_EOS,
                extra_body={"guidance": searches[mode] | {"deadline_ms": deadline_ms}})
            body = json.loads(raw.text)
            out.append(record(mode, deadline_ms, time.perf_counter() - t0, body) | {"request": i})

    try:
        await asyncio.gather(*[worker() for _ in range(clients)])
    finally:
        await client.close()
    return sorted(out, key=lambda r: r["request"])


def summarise(records: list[dict]) -> dict:
    """The distributions and counts of the report, over all requests and per mode."""
    def part(rs: list[dict]) -> dict:
        return {"requests": len(rs), "overrun_s": quantiles([r["overrun_s"] for r in rs]),
                "search_overrun_s": quantiles([r["search_overrun_s"] for r in rs]),
                "chunk_s": quantiles([r["chunk_s"] for r in rs if r["chunk_s"] is not None]),
                "steps": quantiles([r["steps"] for r in rs]),
                "within_deadline_plus_one_chunk": sum(r["within_bound"] for r in rs),
                "within_deadline": sum(r["overrun_s"] <= 0 for r in rs),
                "stopped_by": dict(Counter(str(r["stopped_by"]) for r in rs)),
                "finish_reason": dict(Counter(f for r in rs for f in r["finish_reason"]))}

    modes = sorted({r["mode"] for r in records})
    return {"all": part(records), "by_mode": {m: part([r for r in records if r["mode"] == m]) for m in modes}}


def markdown(result: dict) -> str:
    s, m = result["summary"]["all"], result["machine"]
    lines = [
        "# Deadlines honoured under concurrent load", "",
        f"{result['date']}, {m['cpu_model']} ({m['cores']} cores, shared with other engineers' benchmarks), "
        f"load average {m['load_average_before']} before / {m['load_average_after']} after "
        f"(1-minute load at each answer: min {m['load_1min_during']['min']}, max {m['load_1min_during']['max']}); "
        f"{result['settings']['requests']} requests from {result['settings']['clients']} concurrent clients "
        "(openai SDK), deadline_ms "
        f"{result['settings']['deadline_ms']}, max_tokens {result['settings']['max_tokens']}, modes "
        f"{', '.join(f'{k} {json.dumps(v)}' for k, v in result['settings']['guidance'].items())}, end-of-sequence "
        "tokens banned, an untrained value (`iro values init`).", "",
        f"Command: `{result['command']}`", "",
        "| seconds | n | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
    for label, key in (("overrun: response time - deadline (client)", "overrun_s"),
                       ("search overrun: guidance.elapsed_ms - deadline (server)", "search_overrun_s"),
                       ("one chunk's time (elapsed / steps)", "chunk_s")):
        q = s[key]
        lines.append(f"| {label} | {q['n']} | {q.get('p50', '')} | {q.get('p90', '')} | {q.get('p99', '')} | "
                     f"{q.get('max', '')} |")
    lines += ["", f"Within deadline + one chunk's time: **{s['within_deadline_plus_one_chunk']} of {s['requests']}**"
              f" (within the deadline itself: {s['within_deadline']}). guidance.stopped_by: {s['stopped_by']}; "
              f"finish_reason: {s['finish_reason']}.", "",
              "| mode | requests | within bound | overrun p50 / p90 / max s | chunk p50 / max s | steps p50 |",
              "|---|---|---|---|---|---|"]
    for mode, p in result["summary"]["by_mode"].items():
        o, c = p["overrun_s"], p["chunk_s"]
        lines.append(f"| {mode} | {p['requests']} | {p['within_deadline_plus_one_chunk']} | {o['p50']} / {o['p90']} / "
                     f"{o['max']} | {c.get('p50')} / {c.get('max')} | {p['steps'].get('p50')} |")
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")


def wait_value(url: str, name: str, timeout: float = 300) -> None:
    """Until GET /v1/values says `name` is served (the registry watcher loads a new value)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = httpx.get(url + "/v1/values", timeout=10).json()["data"]
        if any(v["name"] == name and v.get("serving_version") for v in data):
            return
        time.sleep(0.25)  # polling the server's state, with a deadline
    raise RuntimeError(f"value {name} not served after {timeout} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="A running server (default: start one, with the value).")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", help="Base model id (default: the server's first).")
    parser.add_argument("--value", default="deadline", help="Value name (created when a server is started).")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--deadline-ms", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES), help="Search modes, in turn over the requests.")
    parser.add_argument("--samples-per-step", type=int, default=16, help="Every search's samples per step (widths "
                        "planned as the server plans them from a budget).")
    parser.add_argument("--l", type=int, default=8, help="Chunk length in tokens.")
    parser.add_argument("--out-dir", type=Path, help="Write result.json and result.md here.")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown modes {unknown} (known: {', '.join(MODES)})")
    searches = {m: guidance(m, args.samples_per_step, args.l) for m in modes}

    import httpx

    command = "python -m bench.deadlines " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = [round(x, 2) for x in os.getloadavg()]
    srv, url = None, args.url
    if url is None:
        from bench.server import start
        from common.model_store import prepare_default_model
        from valuefn.loader import init_value
        from valuefn.registry import Registry

        srv = start(Path(tempfile.mkdtemp(prefix="deadline-bench-")), ready=False)
        url = srv.url
    try:
        if srv is not None:
            srv.wait_healthy(900)
            init_value(Registry(srv.values_dir), args.value, prepare_default_model())
            wait_value(url, args.value)
        base = args.model or httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"},
                                       timeout=30).json()["data"][0]["id"]
        model = f"{base}+{args.value}"
        kw = dict(clients=args.clients, deadline_ms=args.deadline_ms, max_tokens=args.max_tokens, searches=searches,
                  api_key=args.api_key)
        # warm-up, untimed: one whole wave of clients, two steps each (the first concurrent wave after a
        # start ran one 66 s step here, the later ones ~6 s steps)
        asyncio.run(send_all(url, model, requests=args.clients, **kw | {"max_tokens": 2 * args.l,
                                                                         "deadline_ms": 3_600_000}))
        t0 = time.perf_counter()
        records = asyncio.run(send_all(url, model, requests=args.requests, **kw))
        wall = time.perf_counter() - t0
    finally:
        if srv is not None:
            srv.stop_group()
    loads = [r["load_1min"] for r in records]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu_model": machine_line(), "cores": os.cpu_count(), "load_average_before": load_before,
                          "load_average_after": [round(x, 2) for x in os.getloadavg()],
                          "load_1min_during": {"min": min(loads), "max": max(loads)}},
              "command": command,
              "settings": {"requests": args.requests, "clients": args.clients, "deadline_ms": args.deadline_ms,
                           "max_tokens": args.max_tokens, "guidance": searches,
                           "model": model, "logit_bias": NO_EOS, "server": "started here" if srv else args.url},
              "wall_s": round(wall, 2), "summary": summarise(records), "requests": records}
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "result.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
