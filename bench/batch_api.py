"""A mixed batch (plain and guided lines) through the Batch API with the openai SDK, against the
same requests sent directly (the SDK, `--direct-concurrency` in flight, as `iro rollout` does),
interactive latency idle vs during the batch; then (with a server it started) `kill -9` of the
server's whole process group in the middle of a second batch, a new start on the same data folder
and port, and the batch resumed: its answers counted, duplicates counted.

    python -m bench.batch_api --lines 200 --out-dir bench/results/batch-api   # starts a server
    python -m bench.batch_api --url http://127.0.0.1:8000 --api-key KEY --value demo  # a running one (no kill)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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


TERMINAL = ("completed", "failed", "cancelled", "expired")


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
        concurrency: int, batch_concurrency: int, probe: bool = True) -> dict:
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
    prober = threading.Thread(target=lambda: during.extend(interactive(client, model, stop, None) if probe else []))
    prober.start()
    while batch.status not in TERMINAL:
        time.sleep(1.0)
        batch = client.batches.retrieve(batch.id)
    wall = time.perf_counter() - t0
    stop.set()
    prober.join()
    answers = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    ids = [a["custom_id"] for a in answers]
    direct_wall, direct_tokens = asyncio.run(direct(url, api_key, lines, concurrency))
    return {
        "model": model, "batch_concurrency": batch_concurrency,
        "lines": n, "guided_lines": sum("+" in x["body"]["model"] for x in lines), "max_tokens": max_tokens,
        "batch": {"status": batch.status, "wall_s": round(wall, 1), "completed": batch.request_counts.completed,
                  "failed": batch.request_counts.failed, "duplicates": len(ids) - len(set(ids)),
                  "output_tokens": batch.usage.output_tokens,
                  "tokens_per_s": round(batch.usage.output_tokens / wall, 1)},
        "direct": {"concurrency": concurrency, "wall_s": round(direct_wall, 1), "output_tokens": direct_tokens,
                   "tokens_per_s": round(direct_tokens / direct_wall, 1)},
        "interactive_idle": summary(idle), "interactive_during_batch": summary(during) if during else None,
    }


def wait_value(url: str, admin_key: str, name: str, timeout: float = 120) -> None:
    """Until GET /v1/values reports `name` served (the registry watcher loads a new value)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(url + "/v1/values", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10)
        if any(v["name"] == name and v.get("serving_version") for v in r.json()["data"]):
            return
        time.sleep(0.2)  # polling the server's state with a deadline
    raise RuntimeError(f"value {name} not served after {timeout}s")


def stop_group(server) -> None:
    """Stop the server, then SIGKILL what is left of its process group (vLLM's engine core)."""
    try:
        if server.proc.poll() is None:
            server.stop()
    finally:
        try:
            os.killpg(server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_and_resume(server, env: dict, workdir: Path, api_key: str, model: str, value: str, n: int,
                    guided_fraction: float, max_tokens: int) -> tuple[dict, object]:
    """A batch of `n` lines; `kill -9` of the server's process group once some are answered; the
    server started again on the same data folder and port; the batch waited for. Returns the
    figures and the new server (to be stopped by the caller)."""
    import openai

    from bench import server as bench_server

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    lines = [{**x, "custom_id": f"kill-{x['custom_id']}"}
             for x in batch_lines(model, value, n, guided_fraction, max_tokens)]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    batch = client.batches.create(input_file_id=client.files.create(file=("kill.jsonl", data), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    while batch.request_counts.completed < max(1, n // 4) and batch.status not in TERMINAL:
        time.sleep(0.1)  # polling with the batch's own state as the exit
        batch = client.batches.retrieve(batch.id)
    before = batch.request_counts.completed
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    t_kill = time.perf_counter()
    port = server.url.rsplit(":", 1)[1]
    again = bench_server.start(workdir, env={**env, "IRO_PORT": port, "IRO_VALUES_DIR": str(server.values_dir)},
                               ready=False)
    again.url = server.url  # the same host and port: the same replica, which takes its batch back at once
    try:
        again.wait_healthy(900)
    except BaseException:
        stop_group(again)
        raise
    healthy_after = time.perf_counter() - t_kill
    client = openai.OpenAI(base_url=again.url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    batch = client.batches.retrieve(batch.id)
    while batch.status not in TERMINAL:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    ids = [json.loads(x)["custom_id"] for x in client.files.content(batch.output_file_id).text.splitlines()] \
        if batch.output_file_id else []
    log = again.log_path.read_text(errors="replace")
    return {"lines": n, "status": batch.status, "answered_before_kill": before,
            "restart_to_healthy_s": round(healthy_after, 1),
            "done_after_kill_s": round(time.perf_counter() - t_kill, 1),
            "completed": batch.request_counts.completed, "failed": batch.request_counts.failed,
            "answers": len(ids), "distinct_custom_ids": len(set(ids)), "duplicates": len(ids) - len(set(ids)),
            "missing": len({x["custom_id"] for x in lines} - set(ids)),
            "resumed_logged": "resuming" in log}, again


def markdown(result: dict) -> str:
    b, d, k = result["batch"], result["direct"], result.get("kill_9")
    idle, during = result["interactive_idle"], result["interactive_during_batch"]
    rows = [
        "| | wall s | output tokens | tokens/s |",
        "|---|---|---|---|",
        f"| Batch API ({b['completed']} completed, {b['failed']} failed, {b['duplicates']} duplicates) | "
        f"{b['wall_s']} | {b['output_tokens']} | {b['tokens_per_s']} |",
        f"| same requests direct ({d['concurrency']} in flight, as `iro rollout`) | {d['wall_s']} | "
        f"{d['output_tokens']} | {d['tokens_per_s']} |",
        "",
        "| interactive chat (max_tokens 8) | n | p50 s | p95 s |",
        "|---|---|---|---|",
        f"| idle | {idle['n']} | {idle['p50_s']} | {idle['p95_s']} |",
    ]
    if during:
        rows.append(f"| during the batch | {during['n']} | {during['p50_s']} | {during['p95_s']} |")
    if k:
        rows += ["", f"kill -9 of the server's process group after {k['answered_before_kill']} of {k['lines']} "
                 f"lines, restarted on the same data folder and port (healthy after {k['restart_to_healthy_s']} s): "
                 f"status {k['status']}, {k['answers']} answers, {k['distinct_custom_ids']} distinct custom_ids, "
                 f"{k['duplicates']} duplicates, {k['missing']} missing, resume logged: {k['resumed_logged']}."]
    head = (f"# Batch API vs direct requests\n\n{result['date']}, {result['machine']}, load average "
            f"{result['load_average_before']} before / {result['load_average_after']} after; {result['lines']} lines "
            f"({result['guided_lines']} guided), max_tokens {result['max_tokens']}, batch concurrency "
            f"{result['batch_concurrency']}.\n\nCommand: `{result['command']}`\n\n")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url"), parser.add_argument("--api-key", default="bench-key")
    parser.add_argument("--value", default="demo", help="Value of the guided lines (created when a server is started).")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--guided-fraction", type=float, default=0.25)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-concurrency", type=int, default=4, help="The server's batch concurrency (when it "
                        "starts one).")
    parser.add_argument("--direct-concurrency", type=int, default=8, help="Requests in flight when sent directly "
                        "(iro rollout's default).")
    parser.add_argument("--no-probe", action="store_true", help="No interactive requests during the batch (the "
                        "runner then keeps --batch-concurrency lines in flight: batch vs direct like for like).")
    parser.add_argument("--kill-lines", type=int, default=32, help="Lines of the batch killed and resumed (0: skip).")
    parser.add_argument("--out-dir", type=Path, help="Write result.json and result.md here.")
    args = parser.parse_args(argv)
    import sys

    command = "python -m bench.batch_api " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = [round(x, 1) for x in os.getloadavg()]
    server = env = tmp = None
    admin_key = "bench-admin-key"
    if args.url is None:
        from bench import server as bench_server
        from common.model_store import prepare_default_model
        from valuefn.loader import init_value
        from valuefn.registry import Registry

        tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
        env = {"IRO_API_KEY": args.api_key, "IRO_ADMIN_KEY": admin_key, "IRO_DATA_DIR": str(tmp / "data"),
               "IRO_BATCH_CONCURRENCY": str(args.batch_concurrency)}
        server = bench_server.start(tmp, env=env, ready=False)
        try:
            server.wait_healthy(900)
            init_value(Registry(server.values_dir), args.value, prepare_default_model())
            wait_value(server.url, admin_key, args.value)
        except BaseException:
            stop_group(server)
            raise
        args.url = server.url
    try:
        result = run(args.url, args.api_key, args.value, args.lines, args.guided_fraction, args.max_tokens,
                     args.direct_concurrency, args.batch_concurrency, not args.no_probe)
        if server is not None and args.kill_lines > 0:
            result["kill_9"], server = kill_and_resume(server, env, tmp / "again", args.api_key, result["model"],
                                                       args.value, args.kill_lines, args.guided_fraction,
                                                       args.max_tokens)
    finally:
        if server is not None:
            stop_group(server)
    import platform
    import subprocess

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu or platform.processor(),
              "cores": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": [round(x, 1) for x in os.getloadavg()], "command": command, **result}
    print(json.dumps(result, indent=2))
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "result.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
