"""`iro reward`, `iro train`, `iro publish`: label rollouts, train a value on them, publish it.

    iro reward rollouts.jsonl --reward sentiment -o labelled.jsonl
    iro train labelled.jsonl --name demo --preset smoke          # V_t from V_{t-1}, then publish
    iro train labelled.jsonl --name demo --no-publish --out ckpt  # ...or keep it aside
    iro publish ckpt --name demo
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

import typer

ValuesDir = typer.Option(None, "--values-dir", help="Registry folder (env IRO_VALUES_DIR; default $IRO_HOME/values).")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _registry(values_dir: Optional[Path]):
    from common.paths import default_values_dir
    from valuefn.registry import Registry

    return Registry(values_dir or default_values_dir())


def reward(
    rollouts: Path = typer.Argument(..., exists=True, dir_okay=False, help="Rollout JSONL file."),
    out: Path = typer.Option(..., "--out", "-o", help="Labelled JSONL to write (may be the input)."),
    spec: Optional[str] = typer.Option(None, "--reward", "-r", help=(
        "sentiment | length[:N] | hf:PATH | python:MODULE:FUNCTION | http:URL | weighted sums like "
        "0.8*sentiment+0.2*length.")),
    task: Optional[str] = typer.Option(None, help="Use a task's reward instead: a built-in name (e.g. "
                                       "review-sentiment), a task file or a folder with task.yaml."),
    batch_size: int = typer.Option(64, min=1, help="Responses per reward call."),
):
    """Label every response of a rollout file with a reward (fills the `reward` field)."""
    from trainer.rewards import RewardError, label_records, parse_reward
    from trainer.rollout import write_records
    from trainer.tasks import TaskError, load_task
    from trainer.value_trainer import read_rollouts

    if (spec is None) == (task is None):
        _fail("give exactly one of --reward SPEC or --task NAME|FILE")
    if task is not None:
        try:
            spec = load_task(task).reward
        except TaskError as exc:
            _fail(str(exc))
    try:
        fn = parse_reward(spec)
        records = read_rollouts(rollouts)
        labelled = label_records(records, fn, batch_size=batch_size, progress=True)
    except (RewardError, ValueError) as exc:
        _fail(str(exc))
    write_records(out, labelled)
    scores = [r["reward"] for r in labelled]
    summary = (f"mean {statistics.fmean(scores):.4f}, min {min(scores):.4f}, max {max(scores):.4f}" if scores else "empty")
    typer.echo(f"labelled {len(scores)} responses with {spec!r} ({summary}) -> {out}")


def train(
    labelled: Path = typer.Argument(..., exists=True, dir_okay=False, help="Labelled rollout JSONL (see `iro reward`)."),
    name: str = typer.Option(..., "--name", help="Value name in the registry (V_t follows its CURRENT version)."),
    values_dir: Optional[Path] = ValuesDir,
    preset: str = typer.Option("full", help="smoke | full | path to a YAML file of options."),
    overrides: list[str] = typer.Option([], "--set", help="Override an option: KEY=VALUE (repeatable), e.g. --set lr=1e-4 --set model.lora_r=8."),
    model: Optional[str] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Publish into the registry when done."),
    out: Optional[Path] = typer.Option(None, help="Also write the checkpoint to this folder (needed with --no-publish)."),
    beta: float = typer.Option(1.0, min=1e-6, help="Beta of the new version in the chain."),
):
    """Train value V_t on labelled rollouts (from V_{t-1} when NAME has a version) and publish it."""
    if not publish and out is None:
        _fail("--no-publish keeps nothing without --out DIR")
    from common.model_store import resolve_model
    from trainer.options import parse_override
    from trainer.value_config import ValueTrainConfig
    from trainer.value_trainer import ValueTrainer, examples_from_records, read_rollouts, rollout_policies, save_result
    from valuefn.checkpoint import CheckpointError
    from valuefn.registry import RegistryError, validate_name

    try:
        validate_name(name)
        options = dict(parse_override(o) for o in overrides)
        config = ValueTrainConfig.from_preset(preset, **options)
        records = read_rollouts(labelled)
        examples, skipped = examples_from_records(records)
    except (ValueError, RegistryError) as exc:
        _fail(str(exc))
    if skipped:
        typer.echo(f"skipped {', '.join(f'{n} {why}' for why, n in skipped.items())}", err=True)
    if not examples:
        _fail(f"{labelled} has no labelled responses (run `iro reward` first)")
    registry = _registry(values_dir)
    policies = rollout_policies(records)
    try:
        trainer = ValueTrainer(config, resolve_model(model), registry=registry, name=name)
        _warn_policy_mismatch(registry, name, trainer.parent, policies)
        result = trainer.train(examples, data=str(labelled), extra={"rollout_policies": policies})
        if out is not None:
            save_result(result, out, name)
            typer.echo(f"wrote {out}")
        if publish:
            version = trainer.publish(result, beta=beta)
            chain = [link.version for link in registry.manifest(name, version).chain]
            typer.echo(f"published {name} v{version} (chain {chain})")
    except (CheckpointError, RegistryError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"init_from": result.init_from, **result.metrics}, indent=2))


def publish(
    checkpoint: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder written by `iro train --out`."),
    name: Optional[str] = typer.Option(None, "--name", help="Value name (default: the one it was trained for)."),
    values_dir: Optional[Path] = ValuesDir,
    beta: float = typer.Option(1.0, min=1e-6, help="Beta of the new version in the chain."),
    force: bool = typer.Option(False, help="Publish even if CURRENT moved since it was trained."),
):
    """Publish a trained checkpoint folder as the next version of its value (chain = previous + it)."""
    from trainer.value_trainer import publish_saved
    from valuefn.checkpoint import CheckpointError
    from valuefn.registry import RegistryError

    registry = _registry(values_dir)
    try:
        name, version = publish_saved(checkpoint, registry, name, beta=beta, force=force)
    except (CheckpointError, RegistryError) as exc:
        _fail(str(exc))
    chain = [link.version for link in registry.manifest(name, version).chain]
    typer.echo(f"published {name} v{version} (chain {chain})")


def _warn_policy_mismatch(registry, name: str, parent: int | None, policies: list[dict]) -> None:
    """IRO trains V_t on rollouts of pi_{t-1} = search over V_1..V_{t-1}; say so when the data
    came from another policy (the new version still extends the current chain)."""
    chain = [link.version for link in registry.manifest(name, parent).chain] if parent else []
    for p in policies:
        value = (p["value"] or "").partition("@")[0] or None
        if (value, p["versions"]) != ((name if chain else None), chain):
            source = f"{p['value']} {p['versions']}" if p["value"] else "the base model"
            expected = f"{name} {chain}" if chain else "the base model"
            typer.echo(f"warning: {p['count']} rollouts came from {source}, but V_t follows {expected}", err=True)


def register(app: typer.Typer) -> None:
    """Add `reward`, `train` and `publish` to the `iro` command line."""
    app.command("reward")(reward)
    app.command("train")(train)
    app.command("publish")(publish)
