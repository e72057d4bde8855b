"""A mixed batch (plain and guided lines) through the Batch API with the openai SDK, against the
same requests sent directly (`iro rollout`, or the SDK, `--direct-concurrency` in flight),
interactive latency idle vs during the batch, and `kill -9` of the server's whole process group
(with a server it started): in the middle of the main batch (`--kill-at`, a fraction of its
lines answered) and/or in a separate second batch (`--kill-lines`), a new start on the same data
folder and port, the batch resumed: its answers, distinct custom_ids, duplicates and missing
lines counted.

With `--kill-at` the main batch's wall time contains the kill and the restart, so its throughput
is measured on a separate clean pass first (`--clean-pass`: the same lines, no interactive
traffic, the runner at `--batch-concurrency`), followed by the direct run of the same requests.

    python -m bench.batch_api --lines 500 --clean-pass --kill-at 0.4 --kill-lines 0 --out-dir bench/results/batch-api
    python -m bench.batch_api --lines 200 --out-dir bench/results/batch-api   # starts a server
    python -m bench.batch_api --url http://127.0.0.1:8000 --api-key KEY --value demo  # a running one (no kill)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
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


def interactive(client, model: str, stop: threading.Event | None, count: int | None,
                errors: list | None = None, gap_s: float = 0.0, seed: int = 0) -> list[float]:
    """Latencies (s) of short chat requests sent one after another, back to back or (`gap_s` > 0)
    with exponential pauses of mean `gap_s` between them (a user's think time: the server gets
    gaps, as real interactive traffic leaves). With `errors` a failed request (the server down during
    a restart) is recorded there and the probe goes on after a pause."""
    import random

    rng = random.Random(seed)
    out = []
    while (stop is None or not stop.is_set()) and (count is None or len(out) < count):
        if gap_s > 0 and out:
            pause = rng.expovariate(1 / gap_s)
            if stop is not None and stop.wait(pause):
                break
            if stop is None:
                time.sleep(pause)
        t = time.perf_counter()
        try:
            client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Say hello."}])
        except Exception as exc:
            if errors is None:
                raise
            errors.append(type(exc).__name__)
            if stop is not None:
                stop.wait(1.0)  # the server is down or starting: try again in a second
            continue
        out.append(time.perf_counter() - t)
    return out


def summary(xs: list[float]) -> dict:
    """p50 and p95, and every latency in the order sent (the tail is a handful of requests)."""
    return {"n": len(xs), "p50_s": round(statistics.median(xs), 3), "p95_s": round(percentile(xs, 0.95), 3),
            "latencies_s": [round(x, 3) for x in xs]}


class LoadSampler(threading.Thread):
    """The 1-minute load average every `every` seconds (the machine is shared)."""

    def __init__(self, every: float = 15.0):
        super().__init__(daemon=True)
        self.every, self.samples, self._stop = every, [], threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        s = self.samples or [0.0]
        return {"every_s": self.every, "min": min(s), "mean": round(statistics.mean(s), 2), "max": max(s),
                "samples": self.samples}


async def direct_sdk(url: str, api_key: str, lines: list[dict], concurrency: int) -> dict:
    """The same requests sent directly with the openai SDK, `concurrency` at a time."""
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
    wall = time.perf_counter() - t
    return {"how": f"openai SDK, {concurrency} in flight", "concurrency": concurrency, "wall_s": round(wall, 1),
            "answers": len(lines), "failed": 0, "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}


_SUMMARY = re.compile(r"(\d+) written, (\d+) already there, (\d+) failed \((\d+) tokens in ([\d.]+) s")


def direct_rollout(url: str, api_key: str, lines: list[dict], value: str, concurrency: int, workdir: Path) -> dict:
    """The same requests sent by `iro rollout` (the batch lines as its prompt file; their own
    max_tokens, temperature and seed win): the plain lines, then the guided ones with `--value`,
    one job after the other, `concurrency` in flight each."""
    workdir.mkdir(parents=True, exist_ok=True)
    plain = [x for x in lines if "+" not in x["body"]["model"]]
    guided = [{**x, "body": {**x["body"], "model": x["body"]["model"].split("+")[0]}}
              for x in lines if "+" in x["body"]["model"]]
    jobs, commands = [], []
    t0 = time.perf_counter()
    for name, part, extra in (("plain", plain, []), ("guided", guided, ["--value", value])):
        if not part:
            continue
        prompts, out = workdir / f"{name}.jsonl", workdir / f"{name}-rollouts.jsonl"
        prompts.write_text("".join(json.dumps(x) + "\n" for x in part))
        cmd = [sys.executable, "-m", "iro.cli", "rollout", str(prompts), "-o", str(out), "--server", url,
               "--api-key", api_key, "-c", str(concurrency), "--no-progress", *extra]
        commands.append("iro rollout " + " ".join(cmd[4:]).replace(api_key, "$IRO_API_KEY"))
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        m = _SUMMARY.search(done.stdout + done.stderr)
        if done.returncode != 0 or m is None:
            raise RuntimeError(f"iro rollout ({name}) exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        jobs.append({"lines": len(part), "written": int(m[1]), "failed": int(m[3]), "output_tokens": int(m[4]),
                     "job_s": float(m[5]), "command_wall_s": round(time.perf_counter() - t, 1)})
    wall = time.perf_counter() - t0
    job_s = sum(j["job_s"] for j in jobs)
    tokens = sum(j["output_tokens"] for j in jobs)
    return {"how": f"iro rollout, plain lines then guided lines (--value), {concurrency} in flight",
            "concurrency": concurrency, "commands": commands, "jobs": jobs,
            "wall_s": round(job_s, 1), "commands_wall_s": round(wall, 1),
            "answers": sum(j["written"] for j in jobs), "failed": sum(j["failed"] for j in jobs),
            "output_tokens": tokens, "tokens_per_s": round(tokens / job_s, 1)}


def submit(client, lines: list[dict], name: str):
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return client.batches.create(input_file_id=client.files.create(file=(name, data), purpose="batch").id,
                                 endpoint="/v1/chat/completions", completion_window="24h")


def outcome(client, batch, lines: list[dict]) -> dict:
    """Answers in the output file, error lines, distinct custom_ids, duplicates, missing."""
    answers = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()] \
        if batch.output_file_id else []
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()] \
        if batch.error_file_id else []
    ids = [a["custom_id"] for a in answers + errors]
    return {"status": batch.status, "completed": batch.request_counts.completed,
            "failed": batch.request_counts.failed, "answers": len(answers), "error_lines": len(errors),
            "distinct_custom_ids": len(set(ids)), "duplicates": len(ids) - len(set(ids)),
            "missing": len({x["custom_id"] for x in lines} - set(ids)),
            "output_tokens": batch.usage.output_tokens if batch.usage else None}


def clean_batch(client, lines: list[dict]) -> dict:
    """The batch alone: no interactive traffic, no kill (the runner keeps its full concurrency)."""
    lines = [{**x, "custom_id": f"clean-{x['custom_id']}"} for x in lines]
    t0 = time.perf_counter()
    batch = submit(client, lines, "clean.jsonl")
    while batch.status not in TERMINAL:
        time.sleep(1.0)
        batch = client.batches.retrieve(batch.id)
    wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 1), **outcome(client, batch, lines)}
    out["tokens_per_s"] = round(out["output_tokens"] / wall, 1)
    out["lines_per_s"] = round(out["answers"] / wall, 2)
    return out


def restart(server, env: dict, workdir: Path):
    """A new `iro serve` on the same data folder, registry and port; returns it once healthy."""
    from bench import server as bench_server

    port = server.url.rsplit(":", 1)[1]
    again = bench_server.start(workdir, env={**env, "IRO_PORT": port, "IRO_VALUES_DIR": str(server.values_dir)},
                               ready=False)
    again.url = server.url  # the same host and port: the same replica, which takes its batch back at once
    try:
        again.wait_healthy(900)
    except BaseException:
        again.stop_group()
        raise
    return again


def main_batch(holder: dict, env: dict | None, workdir: Path | None, api_key: str, lines: list[dict], model: str,
               probe: bool, kill_at: float, gap_s: float = 0.0) -> dict:
    """The main batch with the interactive prober beside it; with `kill_at` > 0, `kill -9` of the
    server's process group once that fraction of the lines is answered, a new start on the same
    data folder and port (`holder["server"]` is replaced), and the batch waited for."""
    import openai

    url = holder["url"]
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    t0 = time.perf_counter()
    batch = submit(client, lines, "bench.jsonl")
    stop = threading.Event()
    during: list[float] = []
    probe_errors: list[str] = []
    prober = threading.Thread(target=lambda: during.extend(
        interactive(client, model, stop, None, probe_errors, gap_s) if probe else []))
    prober.start()
    kill = None
    try:
        while batch.status not in TERMINAL:
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
            if kill is None and kill_at > 0 and batch.request_counts.completed >= kill_at * len(lines) \
                    and batch.status not in TERMINAL:
                server = holder["server"]
                before = batch.request_counts.completed
                t_kill = time.perf_counter()
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(30)
                holder["server"] = restart(server, env, workdir)
                up = time.perf_counter()
                log = holder["server"].log_path
                kill = {"at_fraction": kill_at, "answered_before_kill": before,
                        "killed_at_s": round(t_kill - t0, 1), "restart_to_healthy_s": round(up - t_kill, 1),
                        "log": log}
                batch = client.batches.retrieve(batch.id)
                kill["answered_at_restart"] = batch.request_counts.completed
    finally:
        stop.set()
        prober.join()
    wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 1), **outcome(client, batch, lines)}
    if kill is not None:
        kill["done_after_kill_s"] = round(wall - kill["killed_at_s"], 1)
        kill["resumed_logged"] = "resuming" in kill.pop("log").read_text(errors="replace")
        out["kill_9"] = kill
    out["interactive_during_batch"] = summary(during) if during else None
    out["interactive_errors"] = len(probe_errors)
    out["interactive_error_kinds"] = sorted(set(probe_errors))
    return out


def metrics(url: str, *names: str) -> list[float | None]:
    """Counters from one GET /metrics, since the server started (None: not reported): e.g.
    `iro_batch_yield_seconds_total`, the seconds batch lines waited for interactive requests, or
    `iro_batch_preemptions_total`, their engine requests cancelled for one."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families  # as bench/load.py reads them

    text = httpx.get(url + "/metrics", timeout=30).text
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return [round(values[name], 1) if name in values else None for name in names]


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


def kill_and_resume(server, env: dict, workdir: Path, api_key: str, model: str, value: str, n: int,
                    guided_fraction: float, max_tokens: int) -> tuple[dict, object]:
    """A separate batch of `n` lines; `kill -9` of the server's process group once some are
    answered; the server started again on the same data folder and port; the batch waited for.
    Returns the figures and the new server (to be stopped by the caller)."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    lines = [{**x, "custom_id": f"kill-{x['custom_id']}"}
             for x in batch_lines(model, value, n, guided_fraction, max_tokens)]
    batch = submit(client, lines, "kill.jsonl")
    while batch.request_counts.completed < max(1, n // 4) and batch.status not in TERMINAL:
        time.sleep(0.1)  # polling with the batch's own state as the exit
        batch = client.batches.retrieve(batch.id)
    before = batch.request_counts.completed
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    t_kill = time.perf_counter()
    again = restart(server, env, workdir)
    healthy_after = time.perf_counter() - t_kill
    batch = client.batches.retrieve(batch.id)
    while batch.status not in TERMINAL:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    log = again.log_path.read_text(errors="replace")
    return {"lines": n, "answered_before_kill": before, "restart_to_healthy_s": round(healthy_after, 1),
            "done_after_kill_s": round(time.perf_counter() - t_kill, 1), **outcome(client, batch, lines),
            "resumed_logged": "resuming" in log}, again


def run(holder: dict, env: dict | None, tmp: Path | None, args) -> dict:
    import openai

    url, api_key = holder["url"], args.api_key
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    lines = batch_lines(model, args.value, args.lines, args.guided_fraction, args.max_tokens)
    result = {"model": model, "batch_concurrency": args.batch_concurrency, "batch_yield_max_s": args.batch_yield_max_s,
              "batch_max_preemptions": args.batch_max_preemptions, "probe_gap_s": args.probe_gap_s,
              "lines": args.lines,
              "guided_lines": sum("+" in x["body"]["model"] for x in lines), "max_tokens": args.max_tokens,
              "guided_fraction": args.guided_fraction}
    interactive(client, model, None, 3)  # warm-up
    result["interactive_idle"] = summary(interactive(client, model, None, args.idle_requests))
    if args.clean_pass:
        print(f"[{time.strftime('%H:%M:%S')}] clean batch pass", flush=True)
        result["clean_batch"] = clean_batch(client, lines)
    if args.direct != "none":
        print(f"[{time.strftime('%H:%M:%S')}] direct ({args.direct})", flush=True)
        work = Path(tempfile.mkdtemp(prefix="batch-bench-rollout-"))
        result["direct"] = direct_rollout(url, api_key, lines, args.value, args.direct_concurrency, work) \
            if args.direct == "rollout" else asyncio.run(direct_sdk(url, api_key, lines, args.direct_concurrency))
    print(f"[{time.strftime('%H:%M:%S')}] main batch (probe {not args.no_probe}, kill at {args.kill_at})", flush=True)
    main = main_batch(holder, env, tmp / "again" if tmp else None, api_key, lines, model, not args.no_probe,
                      args.kill_at, args.probe_gap_s)
    result["interactive_during_batch"] = main.pop("interactive_during_batch")
    result["batch"] = main
    main["yield_seconds"], main["preemptions"], main["scorer_seconds"] = metrics(  # scorer: the value's passes
        holder["url"], "iro_batch_yield_seconds_total", "iro_batch_preemptions_total", "iro_scorer_batch_seconds_sum")
    if main["output_tokens"] is not None and "kill_9" not in main:
        main["tokens_per_s"] = round(main["output_tokens"] / main["wall_s"], 1)
    if holder.get("server") is not None and args.kill_lines > 0:
        print(f"[{time.strftime('%H:%M:%S')}] separate kill batch", flush=True)
        result["kill_9_separate"], holder["server"] = kill_and_resume(
            holder["server"], env, tmp / "again2", api_key, model, args.value, args.kill_lines, args.guided_fraction,
            args.max_tokens)
    return result


def markdown(result: dict) -> str:
    b, d, c = result["batch"], result.get("direct"), result.get("clean_batch")
    k, ks = b.get("kill_9"), result.get("kill_9_separate")
    idle, during = result["interactive_idle"], result["interactive_during_batch"]
    rows = ["| | wall s | answers | output tokens | tokens/s |", "|---|---|---|---|---|"]
    if c:
        rows.append(f"| Batch API, clean pass (no interactive traffic, no kill; {c['failed']} failed, "
                    f"{c['duplicates']} duplicates) | {c['wall_s']} | {c['answers']} | {c['output_tokens']} | "
                    f"{c['tokens_per_s']} |")
    if d:
        rows.append(f"| same requests direct ({d['how']}) | {d['wall_s']} | {d['answers']} | {d['output_tokens']} "
                    f"| {d['tokens_per_s']} |")
    main_tps = b.get("tokens_per_s", "— (contains the kill and restart)")
    rows.append(f"| Batch API, main pass (interactive prober beside it{', kill -9 in the middle' if k else ''}) | "
                f"{b['wall_s']} | {b['answers']} | {b['output_tokens']} | {main_tps} |")
    gap = result.get("probe_gap_s") or 0
    rows += ["", f"| interactive chat (max_tokens 8; {'pauses of mean ' + str(gap) + ' s' if gap else 'back to back'}"
             " during the batch) | n | p50 s | p95 s |", "|---|---|---|---|",
             f"| idle | {idle['n']} | {idle['p50_s']} | {idle['p95_s']} |"]
    if during:
        rows.append(f"| during the main batch (failed while the server was down: {b['interactive_errors']}) | "
                    f"{during['n']} | {during['p50_s']} | {during['p95_s']} |")
    if b.get("yield_seconds") is not None:
        rows += ["", f"Batch lines' searches waited {b['yield_seconds']} s in all for interactive requests "
                 f"(`iro_batch_yield_seconds_total`; each wait at most the server's --batch-yield-max-s"
                 + (f", {result['batch_yield_max_s']} s" if result.get("batch_yield_max_s") is not None else "")
                 + ")."]
    if b.get("preemptions") is not None:
        rows += ["", f"Engine requests of batch lines cancelled for an arriving interactive request and run again: "
                 f"{b['preemptions']:.0f} (`iro_batch_preemptions_total`; at most the server's "
                 f"--batch-max-preemptions per request"
                 + (f", {result['batch_max_preemptions']}" if result.get("batch_max_preemptions") is not None else "")
                 + ")."]
    if k:
        rows += ["", f"kill -9 of the server's process group during the main batch, after {k['answered_before_kill']} "
                 f"of {result['lines']} lines answered ({k['killed_at_s']} s in), restarted on the same data folder "
                 f"and port (healthy after {k['restart_to_healthy_s']} s, {k['answered_at_restart']} answered then), "
                 f"batch done {k['done_after_kill_s']} s after the kill: status {b['status']}, {b['answers']} answers, "
                 f"{b['error_lines']} error lines, {b['distinct_custom_ids']} distinct custom_ids, "
                 f"{b['duplicates']} duplicates, {b['missing']} missing, resume logged: {k['resumed_logged']}."]
    if ks:
        rows += ["", f"kill -9 in a separate batch of {ks['lines']} lines after {ks['answered_before_kill']}: status "
                 f"{ks['status']}, {ks['answers']} answers, {ks['duplicates']} duplicates, {ks['missing']} missing."]
    load = result.get("load_average_during")
    head = (f"# Batch API vs direct requests\n\n{result['date']}, {result['machine']} ({result['cores']} cores), "
            f"load average {result['load_average_before']} before / {result['load_average_after']} after"
            + (f", 1-min load during the run min {load['min']} / mean {load['mean']} / max {load['max']}"
               if load else "")
            + f"; {result['lines']} lines ({result['guided_lines']} guided), max_tokens {result['max_tokens']}, "
            f"batch concurrency {result['batch_concurrency']}.\n\nCommand: `{result['command']}`\n\n")
    if d and d.get("commands"):
        head += "Direct run:\n\n" + "".join(f"    {x}\n" for x in d["commands"]) + "\n"
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
    parser.add_argument("--batch-yield-max-s", type=float, default=None, help="The server's --batch-yield-max-s "
                        "(when it starts one; default: the server's).")
    parser.add_argument("--batch-max-preemptions", type=int, default=None, help="The server's "
                        "--batch-max-preemptions (when it starts one; default: the server's).")
    parser.add_argument("--probe-gap-s", type=float, default=0.0, help="Mean pause (exponential, seeded) between "
                        "the interactive requests sent during the batch (0: back to back, the server never idle).")
    parser.add_argument("--direct", choices=("rollout", "sdk", "none"), default="rollout",
                        help="How the same requests are sent directly: `iro rollout` or the openai SDK.")
    parser.add_argument("--direct-concurrency", type=int, default=8, help="Requests in flight when sent directly "
                        "(iro rollout's default is 16).")
    parser.add_argument("--idle-requests", type=int, default=20, help="Interactive requests timed while idle.")
    parser.add_argument("--no-probe", action="store_true", help="No interactive requests during the main batch (the "
                        "runner then keeps --batch-concurrency lines in flight: batch vs direct like for like).")
    parser.add_argument("--clean-pass", action="store_true", help="Run the same lines as a batch alone first (no "
                        "interactive traffic, no kill): the batch's throughput.")
    parser.add_argument("--kill-at", type=float, default=0.0, help="kill -9 the server's process group once this "
                        "fraction of the main batch is answered, then start it again (0: no kill in the main batch).")
    parser.add_argument("--kill-lines", type=int, default=32, help="Lines of a separate batch killed and resumed "
                        "(0: skip).")
    parser.add_argument("--out-dir", type=Path, help="Write result.json and result.md here.")
    args = parser.parse_args(argv)

    command = "python -m bench.batch_api " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = [round(x, 1) for x in os.getloadavg()]
    sampler = LoadSampler()
    sampler.start()
    holder: dict = {"server": None, "url": args.url}
    env = tmp = None
    admin_key = "bench-admin-key"
    if args.url is None:
        from bench import server as bench_server
        from common.model_store import prepare_default_model
        from valuefn.loader import init_value
        from valuefn.registry import Registry

        tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
        env = {"IRO_API_KEY": args.api_key, "IRO_ADMIN_KEY": admin_key, "IRO_DATA_DIR": str(tmp / "data"),
               "IRO_BATCH_CONCURRENCY": str(args.batch_concurrency)}
        if args.batch_yield_max_s is not None:
            env["IRO_BATCH_YIELD_MAX_S"] = str(args.batch_yield_max_s)
        if args.batch_max_preemptions is not None:
            env["IRO_BATCH_MAX_PREEMPTIONS"] = str(args.batch_max_preemptions)
        server = holder["server"] = bench_server.start(tmp, env=env, ready=False)
        try:
            server.wait_healthy(900)
            init_value(Registry(server.values_dir), args.value, prepare_default_model())
            wait_value(server.url, admin_key, args.value)
        except BaseException:
            server.stop_group()
            raise
        holder["url"] = server.url
    elif args.kill_at > 0:
        parser.error("--kill-at needs a server this bench starts (no --url)")
    try:
        result = run(holder, env, tmp, args)
    finally:
        if holder["server"] is not None:
            holder["server"].stop_group()
    import platform

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    cpu = " ".join(cpu.split())
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu or platform.processor(),
              "cores": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": [round(x, 1) for x in os.getloadavg()], "load_average_during": sampler.stop(),
              "command": command, **result}
    print(json.dumps(result, indent=2))
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "result.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
