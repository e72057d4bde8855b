"""Online IRO, measured: traffic on prompts a value was not trained on, stored, then one loop
iteration from the stored prompts; held-out reward on those prompts before and after.

Steps (each a real command or SDK call against one `iro serve` this script starts; every command
line is written into the result):

0. `iro loop --task review-sentiment --iterations 1` on the task's own training prompts: the value
   `--served-value` that serves the traffic (the value loaded in the server).
1. `--n` prompts of the task's kind that are in neither of its prompt sets (movie titles and some
   openings and instructions that the task's generator never uses; checked), sent through the
   openai SDK to `<base>+<served value>` with `store: true` and `metadata` (`source=online-bench`).
2. `iro data export --metadata source=online-bench`: every request stored.
3. Before: on the held-out split of the stored prompts (the one `iro loop --from-stored` keeps
   apart: a hash of each prompt's messages), the reward of the answers that were served, and the
   served value's CBS with the loop's evaluation settings and seeds.
4. `iro loop --from-stored --metadata source=online-bench --iterations 1`: a new value trained on
   rollouts of the stored training prompts, evaluated (IRO-1, base, Best-of-N) on the held-out split.
5. (`--continue-served`) `iro loop --from-stored --continue --name <served value>`: online IRO of the
   value that served the traffic, V_2 trained from V_1 on guided rollouts of the stored training
   prompts; IRO-1 (before) and IRO-2 (after) on every held-out stored prompt, in one run's report.

    python -m bench.online_iro --out-dir bench/results/online-iro
    python -m bench.online_iro --n 40 --preset smoke --out-dir /tmp/online-iro   # a quick check
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TASK = "review-sentiment"

#: Movie titles the task's generator never uses (trainer/tasks/review_sentiment.py TITLES).
NEW_TITLES = [
    "The Saffron Engine", "Voices Under Glass", "A Lantern for Bellamy", "The Juniper Protocol", "Moth and Marble",
    "Quarry Lights", "The Hundredth Winter", "Ribbon of Smoke", "The Orchid Ledger", "Granite Lullaby",
    "Sparrow Junction", "The Ferryman's Wager", "Velvet Static", "Anchors of August", "The Chalk Kingdom",
    "Nightjar Hollow", "The Pewter Crown", "Rust Belt Requiem", "Lemon Tree Protocol", "The Mapmaker's Silence",
    "Salt and Sapphire", "The Eleventh Tenant", "Crimson Observatory", "Driftwood Parade", "The Tangerine Affair",
]

#: Openings and instructions of the same kind, phrased as the task's never are.
NEW_OPENINGS = [
    "My sister loved {title}; I am still trying to understand why.",
    "The first scene of {title} had me checking my watch.",
    "{title} opens with a voice-over so heavy it almost sinks the film.",
    "I expected {a_genre} with some spark, and {title} gave me very little of it at first.",
]
NEW_INSTRUCTIONS = [
    "Write the rest of this short movie review (two or three sentences).\n\n{opening}",
    "Continue the review below of the {genre} \"{title}\" with a few more sentences.\n\n{opening}",
]


def online_prompts(n: int) -> list[dict]:
    """`n` review prompts (`{"id", "messages"}`) that are in neither of the task's prompt sets:
    new titles always; the task's openings and instructions mixed with new ones."""
    from trainer.tasks.review_sentiment import GENRES, INSTRUCTIONS, OPENINGS, TITLES, _key, compose

    assert not set(NEW_TITLES) & set(TITLES)
    openings, instructions = OPENINGS + NEW_OPENINGS, INSTRUCTIONS + NEW_INSTRUCTIONS
    combos = sorted(itertools.product(NEW_TITLES, GENRES, openings), key=lambda c: _key("online", *c))
    return compose(combos, instructions, n, salt="online", id_prefix="online")


def check_unseen(prompts: list[dict]) -> dict:
    """How many of `prompts` are in the task's training / held-out prompt sets (must be 0, 0)."""
    from trainer.tasks import load_task

    task = load_task(TASK)
    contents = {p["messages"][0]["content"] for p in prompts}
    train = {x["messages"][0]["content"] for x in task.train_prompts()}
    heldout = {x["messages"][0]["content"] for x in task.eval_prompts()}
    return {"in_task_train": len(contents & train), "in_task_eval": len(contents & heldout),
            "task_train_prompts": len(train), "task_eval_prompts": len(heldout)}


def run_cmd(cmd: list[str], log: Path, env: dict, commands: list[str], shown: str) -> float:
    """Run a command (its output into `log`); its wall seconds; raise on a non-zero exit."""
    commands.append(shown)
    print(f"[{time.strftime('%H:%M:%S')}] {shown}", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shown} exited {done.returncode}:\n{log.read_text()[-3000:]}")
    return round(time.perf_counter() - t, 1)


def serve_traffic(url: str, api_key: str, model: str, prompts: list[dict], max_tokens: int, temperature: float,
                  concurrency: int, metadata: dict) -> dict:
    """The prompts sent through the openai SDK with `store: true` and `metadata`."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=2, timeout=600)
    latencies, failures = [], []
    lock = threading.Lock()

    def one(i_prompt):
        i, p = i_prompt
        t = time.perf_counter()
        try:
            r = client.chat.completions.create(model=model, messages=p["messages"], max_tokens=max_tokens,
                                               temperature=temperature, seed=i, store=True, metadata=metadata)
        except openai.APIError as exc:
            with lock:
                failures.append(f"{p['id']}: {exc}")
            return 0
        with lock:
            latencies.append(time.perf_counter() - t)
        return r.usage.completion_tokens if r.usage else 0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, enumerate(prompts)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(prompts), "answered": len(latencies), "failed": len(failures), "errors": failures[:5],
            "concurrency": concurrency, "wall_s": round(wall, 1), "completion_tokens": tokens,
            "latency_p50_s": round(statistics.median(lat), 2) if lat else None,
            "latency_p95_s": round(lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))], 2) if lat else None}


def mean_ci_dict(values: list[float]) -> dict:
    from trainer.evaluate import mean_ci

    mean, lo, hi = mean_ci(values)
    return {"n": len(values), "mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def served_rewards(client, metadata: dict, heldout_fraction: float, reward: str) -> dict:
    """The task's reward of the answers that were served and stored, per split of the stored prompts."""
    from trainer.rewards import label_records, parse_reward
    from trainer.stored_data import is_heldout, list_stored, prompt_key, to_records

    stored = list_stored(client, metadata=metadata)
    records = [r for c in stored for r in to_records(c)]
    labelled = label_records(records, parse_reward(reward))
    held = [r["reward"] for r in labelled if is_heldout(prompt_key(r["messages"]), heldout_fraction)]
    train = [r["reward"] for r in labelled if not is_heldout(prompt_key(r["messages"]), heldout_fraction)]
    return {"stored": len(stored), "heldout": mean_ci_dict(held), "train": mean_ci_dict(train),
            "tokens_per_answer": round(statistics.mean(len(r["response_token_ids"]) for r in labelled), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="Stored requests (prompts) served.")
    parser.add_argument("--heldout-fraction", type=float, default=0.25)
    parser.add_argument("--preset", default="full", help="Loop preset of both loops (smoke | full | a YAML file).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Loop option KEY=VALUE of the --from-stored loop (repeatable).")
    parser.add_argument("--served-value", default="rs-builtin", help="The value that serves the traffic.")
    parser.add_argument("--new-value", default="rs-online", help="The value `iro loop --from-stored` trains.")
    parser.add_argument("--concurrency", type=int, default=8, help="Requests in flight while serving the traffic.")
    parser.add_argument("--metadata", default="source=online-bench")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--work-dir", type=Path, help="IRO_HOME of the run (default: a new temporary folder).")
    parser.add_argument("--continue-served", action="store_true", help="5. then `iro loop --from-stored --continue` "
                        "on the served value: its chain continued on the stored prompts, before and after on every "
                        "held-out stored prompt.")
    parser.add_argument("--only-continue", action="store_true", help="Only step 5, on the --work-dir of an earlier "
                        "run whose result.json is in --out-dir.")
    args = parser.parse_args(argv)
    command = "python -m bench.online_iro " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.only_continue:
        return only_continue(args, command)

    import openai

    from bench import server as bench_server
    from bench.batch_api import LoadSampler
    from trainer.evaluate import Method, evaluate_method
    from trainer.loop_config import LoopConfig
    from trainer.rollout import RolloutConfig
    from trainer.stored_data import parse_pairs, stored_task
    from trainer.tasks import load_task

    load_before = [round(x, 1) for x in os.getloadavg()]
    sampler = LoadSampler(30.0)
    sampler.start()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="online-iro-"))
    work.mkdir(parents=True, exist_ok=True)
    api_key, admin_key = "bench-key", "bench-admin-key"
    values = work / "values"
    env = {"IRO_HOME": str(work), "IRO_API_KEY": api_key, "IRO_ADMIN_KEY": admin_key,
           "IRO_DATA_DIR": str(work / "data"), "IRO_VALUES_DIR": str(values)}
    metadata = parse_pairs([args.metadata])
    meta_flag = f"{args.metadata}"
    task = load_task(TASK)
    timings: dict[str, float] = {}
    commands: list[str] = []
    result: dict = {"task": TASK, "reward": task.reward, "n": args.n, "heldout_fraction": args.heldout_fraction,
                    "preset": args.preset, "overrides": args.overrides, "work_dir": str(work)}

    prompts = online_prompts(args.n)
    result["prompts"] = {"generated": len(prompts), **check_unseen(prompts)}
    if result["prompts"]["in_task_train"] or result["prompts"]["in_task_eval"]:
        raise SystemExit(f"online prompts overlap the task's prompt sets: {result['prompts']}")
    (work / "online-prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    t = time.perf_counter()
    server = bench_server.start(work, env=env, ready=False)
    try:
        server.wait_healthy(900)
        timings["server_start_s"] = round(time.perf_counter() - t, 1)
        url = server.url
        full_env = {**os.environ, **env, "IRO_BASE_URL": url}
        client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=2, timeout=600)
        base = client.models.list().data[0].id
        iro = [sys.executable, "-m", "iro.cli"]

        # 0. the value that serves the traffic, trained on the task's own training prompts
        loop0 = ["loop", "--task", TASK, "--iterations", "1", "--preset", args.preset, "--name", args.served_value,
                 "--run-dir", str(work / "runs" / args.served_value), "--server", url, "--values-dir", str(values),
                 "--set", "n_eval_prompts=16", "--set", "bon=[1]", "--set", "oracle=false", "--no-progress"]
        timings["train_served_value_s"] = run_cmd(iro + loop0, work / "loop0.log", full_env, commands,
                                                  "iro " + " ".join(loop0))
        served = f"{args.served_value}@1"
        state0 = json.loads((work / "runs" / args.served_value / "state.json").read_text())
        result["served_value"] = {"value": served, "trained_on": f"the {TASK} task's training prompts "
                                  f"({len(task.train)}; preset {args.preset})",
                                  "heldout_task_eval_iro1": state0["stages"]["it1/eval"]["result"]["mean"]}

        # 1. traffic: prompts the served value was not trained on, stored with metadata
        print(f"[{time.strftime('%H:%M:%S')}] serving {len(prompts)} stored requests", flush=True)
        commands.append(f"openai SDK: client.chat.completions.create(model='{base}+{args.served_value}', messages=..., "
                        f"max_tokens={task.max_tokens}, temperature={task.temperature}, seed=i, store=True, "
                        f"metadata={metadata}) x {len(prompts)}, {args.concurrency} in flight")
        result["traffic"] = serve_traffic(url, api_key, f"{base}+{args.served_value}", prompts, task.max_tokens,
                                          task.temperature, args.concurrency, metadata)
        timings["traffic_s"] = result["traffic"]["wall_s"]

        # 2. what was stored
        export = ["data", "export", "-o", str(work / "stored.jsonl"), "--metadata", meta_flag, "--server", url]
        run_cmd(iro + export, work / "data-export.log", full_env, commands, "iro " + " ".join(export))
        result["stored_exported"] = len((work / "stored.jsonl").read_text().splitlines())
        stored = stored_task(task, client, metadata=metadata, heldout_fraction=args.heldout_fraction)
        result["split"] = {"train_prompts": len(stored.train), "heldout_prompts": len(stored.eval)}

        # 3. before: the served answers, and the served value's CBS with the loop's evaluation settings
        result["before_served_answers"] = served_rewards(client, metadata, args.heldout_fraction, task.reward)
        config = LoopConfig.from_preset(args.preset, iterations=1)
        n_eval = len(stored.eval)
        template = RolloutConfig(server=url, api_key=api_key, concurrency=config.concurrency,
                                 temperature=task.temperature, max_tokens=config.max_tokens or task.max_tokens,
                                 seed=config.seed * 1000 + 999, progress=False)
        t = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] before: {served} CBS on {n_eval} held-out stored prompts", flush=True)
        before = evaluate_method(Method("served", f"{served} (CBS)", "cbs", served,
                                        search=task.search.resolve(config.search)),
                                 stored.items("eval"), work / "before-eval", reward=task.reward, template=template)
        timings["before_eval_s"] = round(time.perf_counter() - t, 1)
        commands.append(f"trainer.evaluate.evaluate_method(cbs {served}, {task.search.resolve(config.search)}, "
                        f"the {n_eval} held-out stored prompts, seed {template.seed}) -- the loop's evaluate_heldout")
        result["before_served_value_cbs"] = before.to_dict()

        # 4. one online IRO iteration from the stored prompts
        loop1 = ["loop", "--task", TASK, "--from-stored", "--metadata", meta_flag, "--heldout-fraction",
                 str(args.heldout_fraction), "--iterations", "1", "--preset", args.preset, "--name", args.new_value,
                 "--run-dir", str(work / "runs" / args.new_value), "--server", url, "--values-dir", str(values),
                 "--set", f"n_eval_prompts={n_eval}", *[x for o in args.overrides for x in ("--set", o)],
                 "--no-progress"]
        timings["loop_from_stored_s"] = run_cmd(iro + loop1, work / "loop1.log", full_env, commands,
                                                "iro " + " ".join(loop1))
        run1 = work / "runs" / args.new_value
        state = json.loads((run1 / "state.json").read_text())
        stages = state["stages"]
        result["loop"] = {
            "rollout": {k: stages["it1/rollout"].get(k) for k in ("records", "completion_tokens", "rollout_seconds")},
            "train": {k: stages["it1/train"].get(k) for k in ("examples", "steps", "train_seconds", "heldout_mse",
                                                              "spearman")},
            "stage_seconds": {k: v.get("seconds") for k, v in stages.items()},
            "iro_1": stages["it1/eval"]["result"],
            "baselines": next(v for k, v in stages.items() if k.startswith("baselines/"))["results"],
        }
        if args.out_dir:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            for name in ("report.md", "reward_vs_tokens.png", "reward_per_iteration.png"):
                if (run1 / name).exists():
                    shutil.copy(run1 / name, args.out_dir / f"loop-{name}")
        if args.continue_served:
            result["continuation"] = continue_served(url, work, args, full_env, commands, timings, n_eval)
    finally:
        server.stop_group()
        (work / "partial-result.json").write_text(json.dumps({"commands": commands, "timings": timings, **result},
                                                             indent=2, default=str) + "\n")

    cpu = " ".join(subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                                  text=True).stdout.split())
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu, "cores": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": [round(x, 1) for x in os.getloadavg()],
              "load_average_during": sampler.stop(), "command": command, "commands": commands, "timings": timings,
              **result}
    print(json.dumps(result, indent=2))
    if args.out_dir:
        (args.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "result.md").write_text(markdown(result))


def _env(work: Path) -> dict:
    return {"IRO_HOME": str(work), "IRO_API_KEY": "bench-key", "IRO_ADMIN_KEY": "bench-admin-key",
            "IRO_DATA_DIR": str(work / "data"), "IRO_VALUES_DIR": str(work / "values")}


def continue_served(url: str, work: Path, args, full_env: dict, commands: list[str], timings: dict,
                    n_eval: int) -> dict:
    """5. Online IRO of the value that served the traffic: `iro loop --from-stored --continue --name
    <served value>` in a new run folder. The run adopts the served chain (V_1 of step 0), evaluates
    IRO-1 on every held-out stored prompt (the "before", with the loop's seeds), trains V_2 from V_1
    on guided rollouts of the stored training prompts and evaluates IRO-2 (the "after") on the same
    prompts; the fresh value of step 4 and base are scored on them too."""
    from trainer.evaluate import mean_ci
    from trainer.rewards import label_records, parse_reward
    from trainer.rollout import read_records

    run2 = work / "runs" / f"{args.served_value}-continued"
    loop2 = ["loop", "--task", TASK, "--from-stored", "--metadata", args.metadata, "--heldout-fraction",
             str(args.heldout_fraction), "--iterations", "1", "--preset", args.preset, "--name", args.served_value,
             "--continue", "--run-dir", str(run2), "--server", url, "--values-dir", str(work / "values"),
             "--set", f"n_eval_prompts={n_eval}", "--set", "bon=[1]", "--set", "oracle=false",
             "--no-progress"]
    timings["continue_served_s"] = run_cmd([sys.executable, "-m", "iro.cli", *loop2], work / "loop2.log", full_env,
                                           commands, "iro " + " ".join(loop2))
    stages = json.loads((run2 / "state.json").read_text())["stages"]
    before, after = stages["it1/eval"]["result"], stages["it2/eval"]["result"]
    reward = parse_reward(load_task_reward())
    files = {
        "baseline: base (N=1)": work / "runs" / args.new_value / "eval" / "base.jsonl",
        f"after, fresh value: IRO-1 = {args.new_value}@1 (step 4)":
            next((work / "runs" / args.new_value / "eval").glob("iro-1__*.jsonl")),
    }
    ids = {r["prompt_id"] for r in read_records(next((run2 / "eval").glob("iro-2__*.jsonl")))}
    rows = {f"before: IRO-1 = {before['value']} (the served chain), in the continued run": _result_row(before),
            f"after, chain continued: IRO-2 = {after['value']} (chain {after['versions']})": _result_row(after)}
    for label, path in files.items():
        records = [r for r in read_records(path) if r["prompt_id"] in ids and r.get("sample", 0) == 0]
        rewards = [r["reward"] for r in label_records(records, reward)]
        mean, lo, hi = mean_ci(rewards)
        rows[label] = {"n": len(rewards), "mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    if args.out_dir:
        shutil.copy(run2 / "report.md", args.out_dir / "continued-report.md")
    return {"prompts": len(ids), "rows": rows,
            "rollout": {k: stages["it2/rollout"].get(k) for k in ("policy", "records", "completion_tokens")},
            "train": {k: stages["it2/train"].get(k) for k in ("version", "chain", "init_from", "examples", "steps",
                                                              "heldout_mse", "spearman")},
            "stage_seconds": {k: v.get("seconds") for k, v in stages.items()}}


def _result_row(m: dict) -> dict:
    return {"n": m["prompts"], "mean": round(m["mean"], 4), "ci95": [round(m["ci_low"], 4), round(m["ci_high"], 4)]}


def load_task_reward() -> str:
    from trainer.tasks import load_task

    return load_task(TASK).reward


def only_continue(args, command: str) -> None:
    """Step 5 alone, on the work folder of an earlier run; merged into its result."""
    from bench import server as bench_server
    from bench.batch_api import LoadSampler

    if args.work_dir is None or args.out_dir is None:
        raise SystemExit("--only-continue needs the --work-dir and --out-dir of the earlier run")
    result = json.loads((args.out_dir / "result.json").read_text())
    load_before = [round(x, 1) for x in os.getloadavg()]
    sampler = LoadSampler(30.0)
    sampler.start()
    work, env = args.work_dir, _env(args.work_dir)
    t = time.perf_counter()
    server = bench_server.start(work, env=env, ready=False)
    commands: list[str] = []
    try:
        server.wait_healthy(900)
        timings = {"server_start_s": round(time.perf_counter() - t, 1)}
        full_env = {**os.environ, **env, "IRO_BASE_URL": server.url}
        continuation = continue_served(server.url, work, args, full_env, commands, timings,
                                       result["split"]["heldout_prompts"])
    finally:
        server.stop_group()
    cpu = " ".join(subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                                  text=True).stdout.split())
    result["continuation"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu,
                              "load_average_before": load_before,
                              "load_average_after": [round(x, 1) for x in os.getloadavg()],
                              "load_average_during": sampler.stop(), "command": command, "commands": commands,
                              "timings": timings, **continuation}
    print(json.dumps(result["continuation"], indent=2))
    (args.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "result.md").write_text(markdown(result))


def _row(label: str, r: dict, tokens: str = "") -> str:
    return f"| {label} | {r['n']} | {r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {tokens} |"


def _method_row(label: str, m: dict) -> str:
    return (f"| {label} | {m['prompts']} | {m['mean']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}] | "
            f"{m['tokens_per_prompt']:.0f} |")


def markdown(r: dict) -> str:
    load, lp = r["load_average_during"], r["loop"]
    rows = ["| policy, on the held-out stored prompts | prompts | mean reward [95% CI] | tokens/prompt |",
            "|---|---|---|---|",
            _row(f"before: the answers served and stored ({r['served_value']['value']}, the value's default search)",
                 r["before_served_answers"]["heldout"], f"{r['before_served_answers']['tokens_per_answer']} (answer)"),
            _method_row(f"before: {r['before_served_value_cbs']['label']}, the loop's evaluation settings and seeds",
                        r["before_served_value_cbs"])]
    for m in lp["baselines"]:
        rows.append(_method_row(f"baseline: {m['label']}", m))
    rows.append(_method_row(f"after: IRO-1 = {lp['iro_1']['value']} (CBS {lp['iro_1']['settings']}), the value "
                            "`iro loop --from-stored` trained", lp["iro_1"]))
    t = r["traffic"]
    return (
        f"# Online IRO from stored completions\n\n{r['date']}, {r['machine']} ({r['cores']} cores), load average "
        f"{r['load_average_before']} before / {r['load_average_after']} after, 1-min load during the run min "
        f"{load['min']} / mean {load['mean']} / max {load['max']} (sampled every {load['every_s']:.0f} s).\n\n"
        f"Command: `{r['command']}` (task `{r['task']}`, reward `{r['reward']}`, loop preset `{r['preset']}`)\n\n"
        "What it ran, in order:\n\n" + "".join(f"    {c}\n" for c in r["commands"]) + "\n"
        f"- {r['prompts']['generated']} new prompts: {r['prompts']['in_task_train']} of them among the task's "
        f"{r['prompts']['task_train_prompts']} training prompts, {r['prompts']['in_task_eval']} among its "
        f"{r['prompts']['task_eval_prompts']} held-out prompts.\n"
        f"- traffic: {t['answered']} answered, {t['failed']} failed, {t['wall_s']} s at {t['concurrency']} in flight "
        f"(p50 {t['latency_p50_s']} s, p95 {t['latency_p95_s']} s); `iro data export` wrote "
        f"{r['stored_exported']} stored completions.\n"
        f"- split kept by `--from-stored` (heldout fraction {r['heldout_fraction']}): {r['split']['train_prompts']} "
        f"training prompts, {r['split']['heldout_prompts']} held-out prompts.\n"
        f"- loop: {lp['rollout']['records']} rollouts ({lp['rollout']['completion_tokens']} tokens), value trained on "
        f"{lp['train']['examples']} examples in {lp['train']['steps']} steps (held-out MSE "
        f"{lp['train']['heldout_mse']}, Spearman {lp['train']['spearman']}).\n"
        f"- times (s): {json.dumps(r['timings'])}; loop stages: {json.dumps(lp['stage_seconds'])}\n\n"
        + "\n".join(rows) + "\n" + continuation_markdown(r.get("continuation")))


def continuation_markdown(c: dict | None) -> str:
    if not c:
        return ""
    load = c.get("load_average_during")
    head = ("\n## 5. The served value's chain continued on the stored prompts\n\n"
            + (f"{c['date']}, {c['machine']}, load average {c['load_average_before']} before / "
               f"{c['load_average_after']} after, 1-min load during min {load['min']} / mean {load['mean']} / max "
               f"{load['max']}. Command: `{c['command']}`\n\n" if load else "")
            + "".join(f"    {x}\n" for x in c["commands"])
            + f"\n- rollouts: {c['rollout']['records']} by {c['rollout']['policy']} "
            f"({c['rollout']['completion_tokens']} tokens); V_2 trained from {c['train']['init_from']} on "
            f"{c['train']['examples']} examples in {c['train']['steps']} steps (held-out MSE "
            f"{c['train']['heldout_mse']}, Spearman {c['train']['spearman']})"
            f"; stage seconds {json.dumps(c['stage_seconds'])}\n\n"
            f"| on the {c['prompts']} held-out stored prompts | prompts | "
            "mean reward [95% CI] |\n|---|---|---|\n")
    return head + "".join(f"| {k} | {v['n']} | {v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] |\n"
                          for k, v in c["rows"].items())


if __name__ == "__main__":
    main()
