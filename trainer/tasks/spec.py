"""Task files: prompts, reward and sampling settings of a task, in YAML, checked before any work.

A task file (every path relative to the file itself):

    name: support-json                 # value name by default (default: the folder or file name)
    description: Answer support tickets as JSON.
    prompts:
      train: train.jsonl               # {"messages": [...]} or {"prompt": "..."} lines
      eval: eval.jsonl                 # held-out prompts for `iro eval` and the loop's evaluation
    reward: python:reward.py:score     # anything `iro reward --reward` accepts, weighted sums too
    max_tokens: 64
    temperature: 0.7
    stop: ["\\n\\n"]
    format: chat                       # chat: /v1/chat/completions (prompt strings become a user
                                       # turn); completion: /v1/completions with raw prompt strings
    search: {w: 4, k: 4, l: 8}         # IRO's search at evaluation (common.search_settings.SearchSettings:
                                       # mode cbs by default; loop presets and options win)

Instead of a JSONL file, a prompt set may be generated: `{generator: MODULE:FUNCTION, args: {...}}`
calls the function (MODULE may be a .py file) with `args` and takes the list of prompt lines it
returns. The built-in tasks are such files, shipped in `trainer/tasks/builtin/`.

`load_task(ref)` reads a built-in task by name, a task file, or a folder holding `task.yaml`, and
checks everything it can without a server: the schema (pydantic; each error names the field and
its line), every prompt line, the reward spec (plug-ins imported, model folders present). A bad
file raises `TaskError`.

    >>> task = load_task("review-sentiment")
    >>> task.name, task.reward, len(task.items("train")), len(task.items("eval", 8))
    ('review-sentiment', 'sentiment', 400, 8)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.search_settings import SearchSettings
from trainer.rollout_config import RolloutError
from trainer.rollout_records import PromptItem, parse_prompt_line

BUILTIN_DIR = Path(__file__).parent / "builtin"
TASK_FILE = "task.yaml"


class TaskError(ValueError):
    """A task that cannot be used: the message names the file, the line and the field."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        where = ":".join(str(p) for p in (path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{field + ': ' if field else ''}{message}")
        self.path, self.line, self.field = path, line, field


# --------------------------------------------------------------------------- the schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PromptGenerator(_Strict):
    """A prompt set made by a function instead of read from a file."""

    generator: str = Field(description="MODULE:FUNCTION or path/to/file.py:FUNCTION returning prompt lines.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the function.")


PromptSource = str | PromptGenerator


class PromptSets(_Strict):
    train: PromptSource = Field(description="Training prompts: a JSONL file or a generator.")
    eval: PromptSource = Field(description="Held-out prompts: a JSONL file or a generator.")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _path_or_generator(cls, value: Any) -> Any:
        if not isinstance(value, (str, dict)) or (isinstance(value, str) and not value.strip()):
            raise ValueError("expected a JSONL file path or {generator: MODULE:FUNCTION, args: {...}}, "
                             f"got {value!r}")
        return value


class TaskFile(_Strict):
    """The schema of a task file."""

    name: str | None = Field(None, description="Task name, the value name by default (default: the folder's "
                                               "name for task.yaml, else the file's stem).")
    description: str = ""
    prompts: PromptSets
    reward: str = Field(description="Reward spec, e.g. sentiment, python:reward.py:score, 0.8*hf:rm+0.2*length.")
    max_tokens: int = Field(64, ge=1, le=8192, description="Longest response in tokens.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (a prompt line's own `stop` wins).")
    format: Literal["chat", "completion"] = "chat"
    search: SearchSettings = Field(default_factory=SearchSettings, description="IRO's search at evaluation (the "
                                   "reference: cbs with w=4, k=4, l=8); loop presets and options win.")

    @field_validator("search", mode="wrap")
    @classmethod
    def _strict_search(cls, value: Any, handler: Any) -> Any:
        if isinstance(value, dict):  # as strict as the rest of the file: `w: "4"` is refused
            return SearchSettings.__pydantic_validator__.validate_python(value, strict=True)
        return handler(value)

    @field_validator("reward")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty reward spec; e.g. sentiment or python:reward.py:score")
        return value.strip()

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


# --------------------------------------------------------------------------- the resolved task
@dataclass(frozen=True)
class Task:
    """A loaded task: prompts checked and in memory, the reward spec with absolute paths."""

    name: str
    source: str
    """`built-in` or the task file's path."""
    description: str
    reward: str
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]
    format: Literal["chat", "completion"]
    search: SearchSettings
    train: tuple[PromptItem, ...]
    eval: tuple[PromptItem, ...]

    def items(self, split: Literal["train", "eval"], n: int | None = None) -> list[PromptItem]:
        """The first `n` (default: all) prompts of a split, ready for a rollout (stop strings set)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return list(getattr(self, split)[:n])

    def train_prompts(self) -> list[dict]:
        """Training prompts as `{"id", "messages" | "prompt"}` lines."""
        return [{"id": p.id, **p.body()} for p in self.train]

    def eval_prompts(self) -> list[dict]:
        """Held-out prompts as `{"id", "messages" | "prompt"}` lines."""
        return [{"id": p.id, **p.body()} for p in self.eval]

    def summary(self) -> dict[str, Any]:
        """What `iro tasks show` prints."""
        def first(items: tuple[PromptItem, ...]) -> Any:
            return items[0].messages if items[0].messages is not None else items[0].prompt

        return {"name": self.name, "source": self.source, "description": self.description, "reward": self.reward,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "stop": list(self.stop),
                "format": self.format, "search": self.search.model_dump(exclude_none=True),
                "prompts": {"train": len(self.train), "eval": len(self.eval)},
                "first_prompt": {"train": first(self.train), "eval": first(self.eval)}}


# --------------------------------------------------------------------------- loading
def builtin_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def task_path(ref: str | Path) -> tuple[Path, bool]:
    """(the task file `ref` names, whether it is built in): a built-in name, a file, or a folder
    with task.yaml."""
    if isinstance(ref, str) and (BUILTIN_DIR / f"{ref}.yaml").is_file():
        return BUILTIN_DIR / f"{ref}.yaml", True
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / TASK_FILE
    if not path.is_file():
        raise TaskError(f"unknown task {str(ref)!r}: not a built-in task ({', '.join(builtin_tasks())}) and no "
                        "such task file (or folder with task.yaml); `iro tasks init DIR` writes an example")
    return path, False


def load_task(ref: str | Path) -> Task:
    """Load and check a task (see the module docstring); raises `TaskError` naming file, line and field."""
    path, builtin = task_path(ref)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"cannot read: {exc}", path=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise TaskError(f"not valid YAML: {getattr(exc, 'problem', None) or exc}", path=path,
                        line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise TaskError("expected a mapping (name, prompts, reward, ...)", path=path, line=1)
    try:
        spec = TaskFile.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc, path, root) from None

    def fail(message: str, *loc: str | int) -> TaskError:
        return TaskError(message, path=path, line=_line(root, loc), field=".".join(map(str, loc)))

    base = path.parent
    name = spec.name or (base.name if path.name == TASK_FILE else path.stem)
    from valuefn.registry import RegistryError, validate_name

    try:
        validate_name(name)
    except RegistryError as exc:
        raise fail(f"{exc} (it names the value by default)", "name") from None
    from trainer.rewards import RewardError, resolve_reward

    try:
        reward = resolve_reward(spec.reward, base_dir=base)
    except RewardError as exc:
        raise fail(str(exc), "reward") from None
    sets = {split: _read_prompts(getattr(spec.prompts, split), base, spec, fail, split) for split in ("train", "eval")}
    return Task(name=name, source="built-in" if builtin else str(path), description=spec.description.strip(),
                reward=reward, max_tokens=spec.max_tokens, temperature=spec.temperature, stop=tuple(spec.stop),
                format=spec.format, search=spec.search, train=sets["train"], eval=sets["eval"])


def _read_prompts(source: PromptSource, base: Path, spec: TaskFile, fail, split: str) -> tuple[PromptItem, ...]:
    """The prompts of one split, each line checked (file:line in errors) and shaped by the task."""
    import json

    if isinstance(source, str):
        file = (base / source).expanduser()
        if not file.is_file():
            raise fail(f"prompts file {str(file)!r} does not exist (paths are relative to the task file)",
                       "prompts", split)
        lines: list[tuple[Any, str, int]] = []
        with open(file, encoding="utf-8") as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        lines.append((json.loads(raw), str(file), n))
                    except ValueError as exc:
                        raise TaskError(f"not JSON: {exc}", path=file, line=n, field=f"prompts.{split}") from None
    else:
        from trainer.rewards import RewardError, import_reward

        target = source.generator
        module, sep, fn = target.rpartition(":")
        if sep and module.endswith(".py") and not Path(module).expanduser().is_absolute():
            target = f"{base / module}:{fn}"
        try:
            made = import_reward(target)(**source.args)
        except RewardError as exc:
            raise fail(str(exc).removeprefix("python:"), "prompts", split, "generator") from None
        except (TypeError, ValueError) as exc:
            raise fail(f"{source.generator}(**{source.args}) failed: {exc}", "prompts", split) from None
        if not isinstance(made, list):
            raise fail(f"{source.generator} returned {type(made).__name__}, not a list of prompt lines",
                       "prompts", split, "generator")
        lines = [(obj, f"{source.generator} item", n) for n, obj in enumerate(made, 1)]
    if not lines:
        raise fail("no prompts (the list is empty)", "prompts", split)
    items: list[PromptItem] = []
    seen: set[str] = set()
    for obj, where, n in lines:
        try:
            item = parse_prompt_line(obj, n, where)
        except RolloutError as exc:
            message = str(exc).removeprefix(f"{exc.where}: ")
            raise TaskError(message, path=exc.where, field=f"prompts.{split}") from None
        if item.id in seen:
            raise TaskError(f"duplicate id {item.id!r}", path=where, line=n, field=f"prompts.{split}")
        seen.add(item.id)
        if spec.format == "chat" and item.messages is None:
            item = PromptItem(item.id, [{"role": "user", "content": item.prompt}], None, item.sampling, item.samples)
        elif spec.format == "completion" and item.messages is not None:
            raise TaskError("format is completion, so every line needs a `prompt` string, not `messages`",
                            path=where, line=n, field=f"prompts.{split}")
        if spec.stop and "stop" not in item.sampling:
            item = PromptItem(item.id, item.messages, item.prompt, {**item.sampling, "stop": list(spec.stop)},
                              item.samples)
        items.append(item)
    return tuple(items)


def _line(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at `loc` (the deepest one that exists)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            node, line = match[1], match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _schema_error(exc: ValidationError, path: Path, root: yaml.Node | None) -> TaskError:
    """Every schema error on a line of its own: `file:line: field: what is wrong`."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        field = ".".join(map(str, loc)) or "(top level)"
        message = err["msg"]
        if err["type"] == "missing":
            message = "required field missing"
        elif err["type"] == "extra_forbidden":
            message = f"unknown field (known: {', '.join(_known(loc))})"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            message += f" (got {err['input']!r})"
        lines.append(f"{path}:{_line(root, loc)}: {field}: {message.removeprefix('Value error, ')}")
    first = exc.errors()[0]
    error = TaskError("\n".join(lines))
    error.path, error.line, error.field = path, _line(root, tuple(first["loc"])), ".".join(map(str, first["loc"]))
    return error


def _known(loc: tuple) -> list[str]:
    model: type[BaseModel] = TaskFile
    for key in loc[:-1]:
        annotation = model.model_fields.get(str(key))
        sub = getattr(annotation, "annotation", None) if annotation else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


__all__ = ["BUILTIN_DIR", "PromptGenerator", "PromptSets", "Task", "TaskError", "TaskFile",
           "builtin_tasks", "load_task", "task_path"]
