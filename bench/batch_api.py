"""A mixed batch (plain and guided lines) through the Batch API with the openai SDK, against the
same requests sent directly (HTTP, `concurrency` in flight), and interactive latency idle vs
during the batch.

    python -m bench.batch_api --lines 200 --out bench/results/batch-api.json        # starts a server
    python -m bench.batch_api --url http://127.0.0.1:8000 --api-key KEY --value demo  # a running one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["Write one sentence about the sea.", "Describe a cat in a few words.", "Give me a tip for cooking.",
           "What makes a good friend?", "Name three colours.", "Say something kind.", "Why is the sky blue?",
           "Suggest a name for a dog."]


def batch_lines(model: str, value: str, n: int, guided_fraction: float, max_tokens: int) -> list[dict]:
    every = round(1 / guided_fraction) if guided_fraction > 0 else 0
    lines = []
    for i in range(n):
        guided = every and i % every == 0
        lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": f"{model}+{value}" if guided else model, "max_tokens": max_tokens,
                               "temperature": 0.7, "seed": i,
                               "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}]}})
    return lines


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def interactive(client, model: str, stop: threading.Event | None, count: int | None) -> list[float]:
    """Latencies (s) of short chat requests sent one after another."""
    out = []
    while (stop is None or not stop.is_set()) and (count is None or len(out) < count):
        t = time.perf_counter()
        client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Say hello."}])
        out.append(time.perf_counter() - t)
    return out


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_s": round(statistics.median(xs), 3), "p95_s": round(percentile(xs, 0.95), 3)}


async def direct(url: str, api_key: str, lines: list[dict], concurrency: int) -> tuple[float, int]:
    """The same requests sent directly, `concurrency` at a time: (wall s, completion tokens)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(line):
        nonlocal tokens
        async with gate:
            r = await client.chat.completions.create(**line["body"])
            tokens += r.usage.completion_tokens

    t = time.perf_counter()
    await asyncio.gather(*(one(x) for x in lines))
    return time.perf_counter() - t, tokens


def run(url: str, api_key: str, value: str, n: int, guided_fraction: float, max_tokens: int,
        concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    lines = batch_lines(model, value, n, guided_fraction, max_tokens)
    interactive(client, model, None, 3)  # warm-up
    idle = interactive(client, model, None, 20)
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    t0 = time.perf_counter()
    batch = client.batches.create(input_file_id=client.files.create(file=("bench.jsonl", data), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    stop = threading.Event()
    during: list[float] = []
    prober = threading.Thread(target=lambda: during.extend(interactive(client, model, stop, None)))
    prober.start()
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(1.0)
        batch = client.batches.retrieve(batch.id)
    wall = time.perf_counter() - t0
    stop.set()
    prober.join()
    answers = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    ids = [a["custom_id"] for a in answers]
    direct_wall, direct_tokens = asyncio.run(direct(url, api_key, lines, concurrency))
    return {
        "lines": n, "guided_lines": sum("+" in x["body"]["model"] for x in lines), "max_tokens": max_tokens,
        "batch": {"status": batch.status, "wall_s": round(wall, 1), "completed": batch.request_counts.completed,
                  "failed": batch.request_counts.failed, "duplicates": len(ids) - len(set(ids)),
                  "output_tokens": batch.usage.output_tokens,
                  "tokens_per_s": round(batch.usage.output_tokens / wall, 1)},
        "direct": {"concurrency": concurrency, "wall_s": round(direct_wall, 1), "output_tokens": direct_tokens,
                   "tokens_per_s": round(direct_tokens / direct_wall, 1)},
        "interactive_idle": summary(idle), "interactive_during_batch": summary(during),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url"), parser.add_argument("--api-key", default="bench-key")
    parser.add_argument("--value", default="demo", help="Value of the guided lines (created when a server is started).")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--guided-fraction", type=float, default=0.25)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-concurrency", type=int, default=4, help="Server's batch concurrency (and the "
                        "direct run's requests in flight).")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    server = None
    if args.url is None:
        from bench import server as bench_server
        from common.model_store import prepare_default_model
        from valuefn.loader import init_value
        from valuefn.registry import Registry

        tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
        server = bench_server.start(tmp, env={"IRO_API_KEY": args.api_key, "IRO_DATA_DIR": str(tmp / "data"),
                                              "IRO_BATCH_CONCURRENCY": str(args.batch_concurrency)})
        init_value(Registry(server.values_dir), args.value, prepare_default_model())
        args.url = server.url
        time.sleep(5)  # the registry watcher loads the new value (polls every second or so)
    try:
        result = run(args.url, args.api_key, args.value, args.lines, args.guided_fraction, args.max_tokens,
                     args.batch_concurrency)
    finally:
        if server is not None:
            server.stop()
    import platform
    import subprocess

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": cpu or platform.processor(), **result}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
