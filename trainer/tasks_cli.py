"""`iro tasks`: list the built-in tasks, check and show a task, write an example task to start from.

    iro tasks ls
    iro tasks show json-extract          # a built-in name, a task file, or a folder with task.yaml
    iro tasks init my-task               # my-task/{task.yaml, train.jsonl, eval.jsonl, reward.py}

A task that does not load (a missing prompts file, an unknown reward, a wrong type, ...) is
reported with its file, line and field, with exit code 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Tasks: prompts + reward + settings, for `iro loop` and `iro eval`.")

EXAMPLE_DIR = Path(__file__).parent / "tasks" / "example"
EXAMPLE_FILES = ("task.yaml", "train.jsonl", "eval.jsonl", "reward.py")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("ls")
def ls():
    """The built-in tasks: name, prompts, reward, description."""
    from trainer.tasks import builtin_tasks, load_task

    for name in builtin_tasks():
        task = load_task(name)
        typer.echo(f"{name:18} {len(task.train):4d} train / {len(task.eval):3d} eval prompts  reward {task.reward}\n"
                   f"{'':18} {task.description}")


@app.command("show")
def show(task: str = typer.Argument(..., help="A built-in name, a task file, or a folder with task.yaml.")):
    """Load and check a task, then print it resolved (absolute paths, defaults filled in) as YAML."""
    import yaml

    from trainer.tasks import TaskError, load_task

    try:
        loaded = load_task(task)
    except TaskError as exc:
        _fail(str(exc))
    typer.echo(yaml.safe_dump(loaded.summary(), sort_keys=False, allow_unicode=True, width=100).rstrip())


@app.command("init")
def init(
    directory: Path = typer.Argument(..., help="Folder to write the example task into (created if needed)."),
    force: bool = typer.Option(False, help="Overwrite files that are already there."),
):
    """Write a commented example task (task.yaml, train.jsonl, eval.jsonl, reward.py) that runs as it is."""
    taken = [name for name in EXAMPLE_FILES if (directory / name).exists()]
    if taken and not force:
        _fail(f"{directory} already has {', '.join(taken)}; choose another folder or pass --force")
    directory.mkdir(parents=True, exist_ok=True)
    for name in EXAMPLE_FILES:
        shutil.copyfile(EXAMPLE_DIR / name, directory / name)
    typer.echo(f"wrote {', '.join(str(directory / n) for n in EXAMPLE_FILES)}\n"
               f"next: iro tasks show {directory}; iro loop --task {directory} --preset smoke")


__all__ = ["app"]
