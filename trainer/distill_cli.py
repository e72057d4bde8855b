"""`iro distill`: distil labelled (guided) rollouts into a LoRA policy adapter and publish it.

    iro distill guided.jsonl --method apa --name review-apa --preset smoke --task review-sentiment
    iro distill guided.jsonl --method is-dpo --name review-isdpo --value review@3
    iro distill guided.jsonl --method apa --name review-apa --task review-sentiment --set kl_budget=0.08 --set select=kl

The `full` preset measures a checkpoint every `eval_every` steps, stops at `kl_budget` and publishes
the best checkpoint inside the bounds (trainer/distill_checkpoints.py); the manifest's
`metrics.selection` has the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def distill(
    rollouts: Path = typer.Argument(..., exists=True, dir_okay=False, help="Labelled rollout JSONL (see `iro reward`)."),
    method: str = typer.Option(..., "--method", help="apa | is-dpo | is-ipo"),
    name: str = typer.Option(..., "--name", help="Policy name in the registry (the model name it is served as)."),
    value: Optional[str] = typer.Option(None, "--value", help="NAME[@V]: APA advantages from this value (per token; "
                                        "default: reward minus the mean reward of the prompt's samples); IS-DPO "
                                        "ranks unlabelled rollouts by it."),
    values_dir: Optional[Path] = typer.Option(None, "--values-dir", help="Value registry (env IRO_VALUES_DIR)."),
    policies_dir: Optional[Path] = typer.Option(None, "--policies-dir", help="Policy registry (env IRO_POLICIES_DIR; "
                                                "default $IRO_HOME/policies)."),
    preset: str = typer.Option("full", help="smoke | full | path to a YAML file of options."),
    overrides: list[str] = typer.Option([], "--set", help="Override an option: KEY=VALUE (repeatable), e.g. --set lam=0.5."),
    model: Optional[str] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    reward: Optional[str] = typer.Option(None, "--reward", help="Reward spec to score held-out samples (see `iro reward`)."),
    task: Optional[str] = typer.Option(None, help="Score held-out samples with this task's reward (a built-in name or a task file)."),
    reference: Optional[Path] = typer.Option(None, "--reference", exists=True, dir_okay=False,
                                             help="Rollout JSONL of the base model's samples of the same prompts "
                                             "(what `--set overuse_weight=W` measures over-used bigrams against)."),
):
    """Train a LoRA policy on the frozen base with APA or IS-DPO and publish it as NAME's next version."""
    from common.model_store import resolve_model
    from trainer.options import parse_override
    from trainer.distill import DistillTrainer, distill_examples, prompt_texts
    from trainer.distill_config import DistillConfig
    from trainer.rewards import RewardError, parse_reward
    from trainer.tasks import load_task
    from trainer.value_trainer import examples_from_records, read_rollouts
    from valuefn.checkpoint import CheckpointError
    from registry.policies import PolicyRegistry, default_policies_dir
    from valuefn.registry import RegistryError, validate_name

    started = time.perf_counter()
    if reward is not None and task is not None:
        _fail("give at most one of --reward SPEC or --task NAME")
    try:
        validate_name(name, "policy")
        options = dict(parse_override(o) for o in overrides)
        config = DistillConfig.from_preset(preset, **({"method": method} | options))
        if task is not None:
            reward = load_task(task).reward  # a TaskError (ValueError) names the file, line and field
        reward_fn = parse_reward(reward) if reward else None
        records = read_rollouts(rollouts)
        examples, skipped = examples_from_records(records)
        if config.overuse_weight and reference is None:
            raise ValueError("--set overuse_weight needs --reference (the base model's samples of the same prompts)")
        base_samples = None
        if reference is not None:  # only their tokens count: a reward is not needed
            base_samples = examples_from_records([{**r, "reward": 0.0} for r in read_rollouts(reference)])[0]
    except (ValueError, RegistryError, RewardError) as exc:
        _fail(str(exc))
    if not examples and not (value is not None and config.method != "apa" and skipped.get("unlabelled")):
        _fail(f"{rollouts} has no labelled responses (run `iro reward` first, or give --value to rank "
              f"{config.method} pairs by a value)")
    texts = prompt_texts(records)
    model_path = resolve_model(model)
    registry = PolicyRegistry(policies_dir or default_policies_dir())
    try:
        chain = None
        if value is not None:
            from valuefn.cli import default_values_dir
            from valuefn.loader import BackbonePool, ValueLoader
            from valuefn.registry import Registry

            values = Registry(values_dir or default_values_dir())
            vname, version = values.resolve(value)
            chain = ValueLoader(values, BackbonePool(model_path)).load_chain(vname, version)
        examples, skipped, ranked_by = distill_examples(records, config.method, chain)
        if skipped:
            typer.echo(f"skipped {', '.join(f'{n} {why}' for why, n in skipped.items())}", err=True)
        if ranked_by == "value":
            typer.echo(f"no rewards in {rollouts}: {config.method} pairs ranked by the value {value}", err=True)
        trainer = DistillTrainer(config, model_path)
        result = trainer.train(examples, value=chain if config.method == "apa" else None, reward_fn=reward_fn,
                               prompt_texts=texts, data=str(rollouts),
                               extra={"value": value, "reward": reward, "ranked_by": ranked_by},
                               reference=base_samples)
        result.training["command_seconds"] = round(time.perf_counter() - started, 3)
        version = trainer.publish(result, registry, name)
    except (CheckpointError, RegistryError, ValueError) as exc:
        _fail(str(exc))
    selection = result.metrics["selection"]
    typer.echo(f"checkpoint: step {selection['chosen_step']} of {result.training['steps']} ({selection['rule']}: "
               f"{selection['why']})" + (f"; stopped early: {selection['stopped']}" if selection["stopped"] else ""),
               err=True)
    if selection["eligible"] is False:
        typer.echo("warning: the published checkpoint is outside the bounds (kl_budget / max_distinct_drop); "
                   "--set on_none_eligible=refuse publishes nothing in that case", err=True)
    typer.echo(f"published policy {name} v{version} ({config.method}) -> {registry.path(name, version)}")
    typer.echo(json.dumps({"wall_seconds": result.training["command_seconds"], **result.metrics}, indent=2))


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
