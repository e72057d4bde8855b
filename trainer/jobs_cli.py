"""`iro rollout`, `iro eval`, `iro frontier`, `iro loop`: sample through the server, compare methods,
sweep the reward-vs-compute frontier, run IRO.

    iro rollout prompts.jsonl -o rollouts.jsonl --samples-per-prompt 4 --concurrency 16
    iro eval --task review-sentiment --value review --bon 1,2,4,8,16 --out eval/
    iro frontier --task review-sentiment --value review --budgets 1,4,16,32 --out frontier/
    iro loop --task review-sentiment --iterations 3 --values-dir ~/.cache/iro/values --preset full
    iro loop --task my-task/task.yaml --preset smoke      # any task file (see `iro tasks init`)
    iro loop --preset full --iterations 3 --distill apa --distill is-dpo --policies-dir ~/.cache/iro/policies
                                   # the server must run `iro serve --policies-dir` on the same folder

A bad task file is reported (file, line, field) with exit code 2 before any server call.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from common.search_settings import SEARCH_MODES
from trainer.rollout_config import server_url

SERVER = typer.Option(None, "--server", help="Server root (env IRO_BASE_URL; default http://127.0.0.1:8000).")
API_KEY = typer.Option(None, "--api-key", help="Bearer token for /v1 (env IRO_API_KEY).")
CONCURRENCY = typer.Option(16, "--concurrency", "-c", min=1, help="Requests in flight at once.")


Mode = Enum("Mode", {m: m for m in SEARCH_MODES}, type=str)
"""`--mode` choices: every mode of `common.search_settings.SearchMode`."""


class Backend(str, Enum):
    server = "server"
    ray = "ray"


def _quiet_http() -> None:
    """One INFO line per HTTP request would bury the progress bar."""
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


TASK = typer.Option("review-sentiment", "--task", "-t", help="Built-in task name (see `iro tasks ls`), a task "
                    "file, or a folder with task.yaml.")


def _load_task(ref: str):
    """The task `ref` names, or exit 2 with the task error (before any server or registry use)."""
    from trainer.tasks import TaskError, load_task

    try:
        return load_task(ref)
    except TaskError as exc:
        _fail(str(exc))


def rollout(
    prompts: Path = typer.Argument(..., exists=True, dir_okay=False,
                                   help="Prompt JSONL (messages/prompt, or OpenAI batch lines)."),
    out: Path = typer.Option(..., "--out", "-o", help="Rollout JSONL to append to (a re-run skips what is there)."),
    server: Optional[str] = SERVER,
    api_key: Optional[str] = API_KEY,
    model: Optional[str] = typer.Option(None, help="Model id (default: the server's base model)."),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", "-n", min=1, help="Responses per prompt."),
    concurrency: int = CONCURRENCY,
    value: Optional[str] = typer.Option(None, help='Sample from the guided policy of this value: "name" or "name@3".'),
    mode: Optional[Mode] = typer.Option(None, help="Guided search mode (default: the value's)."),
    w: Optional[int] = typer.Option(None, "--w", min=1, help="Beam width (cbs)."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Successors per beam (cbs) or N (bon)."),
    l: Optional[int] = typer.Option(None, "--l", min=1, help="Chunk length in tokens (cbs)."),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0, help="Sampling temperature."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Most tokens per response."),
    seed: Optional[int] = typer.Option(None, help="Job seed (per-sample seeds derive from it): a re-run repeats."),
    backend: Backend = typer.Option(Backend.server, help="server (HTTP, guided or not) or ray (offline vLLM on Ray, "
                                                         "base model only; needs the ray extra)."),
    via_batch: bool = typer.Option(False, "--via-batch", help="Submit the job through the server's Batch API "
                                   "(/v1/files + /v1/batches; needs the openai package): the server runs it beside "
                                   "interactive traffic, at a lower priority."),
    keep_batch_files: bool = typer.Option(False, "--keep-batch-files", help="--via-batch: keep the batch's input, "
                                          "output and error files on the server (default: deleted once the "
                                          "records are written, as they count against the key's file quota)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder for prompt_text (default: the embedded "
                                                       "model)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Sample responses to every prompt into a rollout JSONL file (resumable, bounded concurrency)."""
    _quiet_http()
    import os

    from clients.errors import IroClientError
    from common.search_settings import SearchOverrides
    from trainer.rollout import RolloutConfig, RolloutError, read_prompts, run_rollout

    if via_batch and backend != Backend.server:
        _fail("--via-batch submits to the server's Batch API: it does not combine with --backend ray")
    if keep_batch_files and not via_batch:
        _fail("--keep-batch-files keeps the files of --via-batch: give --via-batch too")
    try:
        config = RolloutConfig(
            server=server_url(server), api_key=api_key or os.environ.get("IRO_API_KEY"), model=model,
            samples_per_prompt=samples_per_prompt, concurrency=concurrency, value=value,
            search=SearchOverrides(mode=mode.value if mode else None, w=w, k=k, l=l), temperature=temperature,
            max_tokens=max_tokens,
            seed=seed, backend="batch" if via_batch else backend.value, progress=progress, tokenizer=tokenizer,
            keep_batch_files=keep_batch_files)
        items = read_prompts(prompts)
        stats = run_rollout(items, out, config)
    except RolloutError as exc:
        _fail(str(exc))
    except IroClientError as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    typer.echo(f"{out}: {stats.summary()}")
    if not stats.complete:
        _fail(f"{stats.total - stats.skipped - stats.written} responses missing; run the same command again to "
              "retry them", code=1)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"expected integers >= 1, got {text!r}")
    return values


def eval_(
    task: str = TASK,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for answers, eval.json, eval.md and the plot."),
    server: Optional[str] = SERVER,
    api_key: Optional[str] = API_KEY,
    value: Optional[str] = typer.Option(None, help='Value for Best-of-N and IRO ("name" = the version served now, or '
                                                   '"name@3"); without it only the base model is evaluated.'),
    n_prompts: int = typer.Option(32, "--n-prompts", min=1, help="Held-out prompts to use (the first N)."),
    bon: str = typer.Option("1,2,4,8,16", help="N of the Best-of-N baselines (1 = plain base sampling)."),
    w: Optional[int] = typer.Option(None, "--w", min=1, help="IRO beam width (default: the task's search, 4)."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="IRO successors per beam (default: the task's, 4)."),
    l: Optional[int] = typer.Option(None, "--l", min=1, help="IRO chunk length in tokens (default: the task's, 8)."),
    iro: bool = typer.Option(True, "--iro/--no-iro", help="Also evaluate IRO (CBS over the value chain)."),
    oracle: bool = typer.Option(True, "--oracle/--no-oracle", help="Also Best-of-N ranked by the reward itself "
                                "(the same max(N) base samples per prompt; the headroom a value could reach)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Default: the task's."),
    temperature: Optional[float] = typer.Option(None, min=0.0, max=2.0, help="Default: the task's."),
    reward: Optional[str] = typer.Option(None, help="Reward spec instead of the task's (see `iro reward`)."),
    concurrency: int = CONCURRENCY,
    seed: int = typer.Option(0, help="Seed of every method's sampling."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Base vs Best-of-N vs IRO on held-out prompts: reward (95% CI), distinct-2, tokens; table and plot."""
    _quiet_http()
    import os

    from clients.errors import IroClientError
    from common.search_settings import SearchOverrides
    from trainer.evaluate import BASE, Method, best_of_n, evaluate, resolve_value, write_results
    from trainer.rewards import RewardError, resolve_reward
    from trainer.rollout import RolloutConfig, RolloutError

    spec = _load_task(task)
    if reward is not None:
        try:
            resolve_reward(reward)
        except RewardError as exc:
            _fail(f"--reward: {exc}")
    url, key = server_url(server), api_key or os.environ.get("IRO_API_KEY")
    reward, ns = reward or spec.reward, _int_list(bon)
    try:
        value = resolve_value(url, key, value) if value else None
        template = RolloutConfig(server=url, api_key=key, concurrency=concurrency, seed=seed, progress=progress,
                                 max_tokens=max_tokens or spec.max_tokens,
                                 temperature=temperature if temperature is not None else spec.temperature)
        prompts = spec.items("eval", n_prompts)
        results = evaluate(prompts, [BASE], out, reward=reward, template=template)
        if (value is not None or oracle) and max(ns) > 1:  # Best-of-N: one set of samples, both rankings
            results += best_of_n(prompts, ns, out, reward=reward, template=template, value=value, oracle=oracle)
        if iro and value is not None:
            method = Method("iro", "IRO", "cbs", value, search=spec.search.resolve(SearchOverrides(w=w, k=k, l=l)))
            results += evaluate(prompts, [method], out, reward=reward, template=template)
    except (RolloutError, RewardError, ValueError) as exc:
        _fail(str(exc))
    except IroClientError as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    meta = {"task": spec.name, "source": spec.source, "prompts": len(prompts), "value": value, "reward": reward,
            "max_tokens": template.max_tokens, "temperature": template.temperature, "seed": seed}
    paths = write_results(results, out, title=f"{spec.name}: base vs Best-of-N vs IRO", meta=meta)
    typer.echo(paths["md"].read_text())
    typer.echo(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")


def frontier(
    task: str = TASK,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for every arm's answers, eval.json, eval.md and the "
                             "reward-vs-tokens and reward-vs-wall-time plots (resumable: a finished arm is kept)."),
    value: str = typer.Option(..., help='The value every arm but base uses ("name" = the version served now, or '
                                        '"name@3").'),
    server: Optional[str] = SERVER,
    api_key: Optional[str] = API_KEY,
    n_prompts: int = typer.Option(16, "--n-prompts", min=1, help="Held-out prompts to use (the first N)."),
    budgets: str = typer.Option("1,2,4,8,16,32", help="Token budgets as multiples of max_tokens (1 = one plain "
                                "answer): Best-of-N at N = each, each search mode at budget_tokens = each x "
                                "max_tokens, its widths planned by the server."),
    modes: str = typer.Option(",".join(m for m in SEARCH_MODES if m != "bon"),
                              help="Search modes to sweep (comma-separated; Best-of-N is always there)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Default: the task's."),
    concurrency: int = typer.Option(8, "--concurrency", "-c", min=1, help="Requests in flight at once."),
    seed: int = typer.Option(0, help="Seed of every arm's sampling."),
    oracle: bool = typer.Option(True, "--oracle/--no-oracle", help="Also Best-of-N ranked by the reward itself."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """The reward-vs-compute frontier: base, Best-of-N by value and by reward, and CBS, PF and DVTS at
    token budgets from 1x to 32x max_tokens; reward (95% CI), distinct-2, tokens and wall seconds per
    prompt; table and two plots."""
    _quiet_http()
    from clients.errors import IroClientError
    from trainer import frontier as sweep
    from trainer.rewards import RewardError
    from trainer.rollout import RolloutError

    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(sweep.SWEEP_MODES))
    if unknown or not wanted:
        raise typer.BadParameter(f"unknown modes {unknown} (known: {', '.join(sweep.SWEEP_MODES)})",
                                 param_hint="--modes")
    multiples = _int_list(budgets)  # each >= 1
    try:
        paths = sweep.run(task=task, out=out, value=value, server=server, api_key=api_key, n_prompts=n_prompts,
                          budgets=multiples, modes=wanted, max_tokens=max_tokens, concurrency=concurrency, seed=seed,
                          oracle=oracle, progress=progress)
    except (RolloutError, RewardError, ValueError) as exc:
        _fail(str(exc))
    except IroClientError as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    typer.echo(paths["md"].read_text())
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def loop(
    task: str = TASK,
    iterations: int = typer.Option(3, min=1, help="IRO iterations T."),
    server: Optional[str] = SERVER,
    api_key: Optional[str] = API_KEY,
    admin_key: Optional[str] = typer.Option(None, "--admin-key",
                                            help="Bearer token for /v1/values (env IRO_ADMIN_KEY)."),
    values_dir: Optional[Path] = typer.Option(None, "--values-dir", help="The server's value registry (env "
                                              "IRO_VALUES_DIR; default $IRO_HOME/values)."),
    name: Optional[str] = typer.Option(None, help="Value name (default: the task's name)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where state, rollouts and the report go "
                                           "(default runs/<name>); re-running resumes it."),
    preset: str = typer.Option("full", help="smoke | full | path to a YAML file of loop options."),
    overrides: list[str] = typer.Option([], "--set", help="Override a loop option KEY=VALUE (repeatable), e.g. "
                                        "--set n_eval_prompts=16 --set train.lr=1e-4."),
    model: Optional[str] = typer.Option(None, help="Base model folder for value training (default: the embedded one)."),
    distill: list[str] = typer.Option([], "--distill", help="After the last iteration, distil the guided policy into a "
                                      "LoRA policy `<name>-<method>` with this method (apa | is-dpo | is-ipo; "
                                      "repeatable or a comma list) and evaluate it; the server must serve "
                                      "--policies-dir."),
    policies_dir: Optional[Path] = typer.Option(None, "--policies-dir", help="The server's policy registry (`iro "
                                                "serve --policies-dir`; env IRO_POLICIES_DIR; default "
                                                "$IRO_HOME/policies)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    from_stored: bool = typer.Option(False, "--from-stored", help="Online IRO: train on the deduplicated prompts of "
                                     "the server's stored completions (store: true) and evaluate on their held-out "
                                     "split (the task's own held-out prompts when it is empty); the task's reward "
                                     "scores them. Needs the openai package."),
    metadata: list[str] = typer.Option([], "--metadata", help="--from-stored: only completions with this metadata "
                                       "pair key=value (repeatable)."),
    since: Optional[str] = typer.Option(None, "--since", help="--from-stored: only completions created at or after "
                                        "this date (ISO 8601) or Unix time."),
    heldout_fraction: float = typer.Option(0.1, "--heldout-fraction", min=0.0, max=0.9,
                                           help="--from-stored: share of stored prompts kept for evaluation."),
    continue_chain: bool = typer.Option(False, "--continue", help="Continue the chain the registry serves under "
                                        "--name (CURRENT V_1..V_N) instead of starting one: its IRO-N is evaluated "
                                        "on this run's held-out prompts first, then iterations N+1..N+T guided by "
                                        "it. With --from-stored: online IRO of the value that served the traffic. "
                                        "A new run (a new --run-dir)."),
):
    """Run IRO: T x (rollout -> reward -> train V_t -> publish -> evaluate), then Best-of-N baselines and a report;
    with --distill, distilled LoRA policies too."""
    _quiet_http()
    import os

    from clients.errors import IroClientError
    from common.paths import default_values_dir
    from trainer.loop import IroLoop, LoopConfig, LoopError
    from trainer.options import parse_override
    from trainer.rewards import RewardError
    from trainer.rollout import RolloutError
    from valuefn.checkpoint import CheckpointError
    from valuefn.registry import RegistryError

    spec = _load_task(task)
    if from_stored:
        spec = _stored_task(spec, server, api_key, metadata, since, heldout_fraction)
    elif metadata or since:
        _fail("--metadata and --since select stored completions: give --from-stored too")
    try:
        options = dict(parse_override(o) for o in overrides)
        if distill:
            options["distill"] = distill
        flags = {"task": task, "iterations": iterations, "name": name, "progress": progress}
        clash = sorted(set(flags) & set(options))
        if clash:
            raise ValueError(f"--set {clash[0]}=... repeats an option of its own: use --{clash[0]}"
                             + (" / --no-progress" if clash[0] == "progress" else ""))
        config = LoopConfig.from_preset(preset, **flags, **options)
    except ValueError as exc:
        _fail(str(exc))
    try:
        runner = IroLoop(config, task=spec, run_dir=run_dir or Path("runs") / (name or spec.name),
                         values_dir=values_dir or default_values_dir(), server=server_url(server),
                         api_key=api_key or os.environ.get("IRO_API_KEY"),
                         admin_key=admin_key or os.environ.get("IRO_ADMIN_KEY"), model=model,
                         policies_dir=policies_dir, continue_chain=continue_chain)
        report = runner.run()
    except (LoopError, RolloutError, RewardError, RegistryError, CheckpointError, ValueError) as exc:
        _fail(str(exc), code=1)
    except IroClientError as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    typer.echo(report.read_text())
    typer.echo(f"wrote {report}")


def _stored_task(spec, server, api_key, metadata, since, heldout_fraction):
    """The task with the stored completions' prompts (`iro loop --from-stored`), or exit 1 saying why."""
    try:
        import openai
    except ImportError:
        _fail("--from-stored needs the openai package (pip install openai)")

    from trainer.data_cli import _client, _since
    from trainer.stored_data import parse_pairs, stored_task

    try:
        return stored_task(spec, _client(server, api_key), metadata=parse_pairs(metadata), since=_since(since),
                           heldout_fraction=heldout_fraction)
    except (ValueError, openai.APIError) as exc:
        _fail(f"--from-stored: {exc}", code=1)


def register(app: typer.Typer) -> None:
    """Add `rollout`, `eval`, `frontier` and `loop` to the `iro` command line."""
    app.command("rollout")(rollout)
    app.command("eval")(eval_)
    app.command("frontier")(frontier)
    app.command("loop")(loop)

