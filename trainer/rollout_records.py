"""The rollout job's files and plan: prompts in (JSONL or OpenAI batch lines), one record per
response out (appended, resumable), and the (prompt, sample) tasks still to do.

    items = read_prompts("prompts.jsonl")
    tasks, stats = pending(items, "rollouts.jsonl", RolloutConfig(samples_per_prompt=2))

The record format is described in `trainer.rollout`; every backend (the server's, `trainer.rollout`,
Ray's, `trainer.rollout_ray`) writes it with `make_record` (`record_from_response` for an API answer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.search_settings import SearchSettings
from trainer.rollout_config import SAMPLING_KEYS, RolloutConfig, RolloutError

log = logging.getLogger(__name__)

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
SEARCH_FIELDS: tuple[str, ...] = tuple(SearchSettings.model_fields)
"""The search fields a record's `policy` holds (what the server's `guidance` answer reports)."""

# --------------------------------------------------------------------------- input
@dataclass(frozen=True)
class PromptItem:
    """One prompt of the input file."""

    id: str
    messages: list[dict] | None = None
    prompt: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    """Per-prompt request fields (from a batch-file body); they override the job's."""
    samples: int | None = None
    """Samples for this prompt (a batch body's `n`); None: the job's samples_per_prompt."""

    def body(self) -> dict[str, Any]:
        return {"messages": self.messages} if self.messages is not None else {"prompt": self.prompt}


def parse_prompt_line(obj: Any, line_no: int, where: str = "") -> PromptItem:
    """One input line (already JSON-decoded) as a `PromptItem`.

    >>> parse_prompt_line({"prompt": "Once upon a time"}, 3)
    PromptItem(id='3', messages=None, prompt='Once upon a time', sampling={}, samples=None)
    >>> item = parse_prompt_line({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
    ...     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
    ...              "max_completion_tokens": 8, "n": 2}}, 1)
    >>> item.id, item.sampling, item.samples
    ('r1', {'max_tokens': 8}, 2)
    """
    where = f"{where}:{line_no}" if where else f"line {line_no}"
    if not isinstance(obj, dict):
        raise RolloutError(f"expected a JSON object, got {type(obj).__name__}", where=where)
    batch = "body" in obj or "custom_id" in obj
    if batch:
        body, url = obj.get("body"), obj.get("url")
        if not isinstance(body, dict):
            raise RolloutError("a batch-file line needs a `body` object", where=where)
        if obj.get("method", "POST").upper() != "POST":
            raise RolloutError(f"unsupported method {obj.get('method')!r} (only POST)", where=where)
        if url is not None and url not in (CHAT_URL, COMPLETIONS_URL):
            raise RolloutError(f"unsupported url {url!r} (only {CHAT_URL} and {COMPLETIONS_URL})", where=where)
        if url == CHAT_URL and "messages" not in body:
            raise RolloutError(f"a {CHAT_URL} body needs `messages`", where=where)
        if url == COMPLETIONS_URL and "prompt" not in body:
            raise RolloutError(f"a {COMPLETIONS_URL} body needs `prompt`", where=where)
        if body.get("stream"):
            raise RolloutError("streaming requests cannot be batched; remove `stream`", where=where)
        source, raw_id = body, obj.get("custom_id")
    else:
        source, raw_id = obj, obj.get("id")
    messages, prompt = source.get("messages"), source.get("prompt")
    if (messages is None) == (prompt is None):
        raise RolloutError("give exactly one of `messages` (chat) or `prompt` (a string)", where=where)
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise RolloutError("`messages` must be a non-empty list of {role, content} objects", where=where)
    elif not isinstance(prompt, str) or not prompt:
        raise RolloutError("`prompt` must be a non-empty string", where=where)
    sampling = {k: source[k] for k in SAMPLING_KEYS if source.get(k) is not None}
    if source.get("max_completion_tokens") is not None:
        sampling["max_tokens"] = source["max_completion_tokens"]
    samples = source.get("n") if batch else obj.get("samples")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise RolloutError(f"`n` must be a positive integer, got {samples!r}", where=where)
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise RolloutError(f"id must be a string or an integer, got {raw_id!r}", where=where)
    return PromptItem(str(raw_id) if raw_id is not None else str(line_no), messages, prompt, sampling, samples)


def read_prompts(path: str | Path) -> list[PromptItem]:
    """The prompts of an input JSONL file (blank lines skipped; ids must be unique)."""
    items: list[PromptItem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise RolloutError(f"not JSON: {exc}", where=f"{path}:{n}") from None
            item = parse_prompt_line(obj, n, str(path))
            if item.id in seen:
                raise RolloutError(f"duplicate id {item.id!r}", where=f"{path}:{n}")
            seen.add(item.id)
            items.append(item)
    return items


def prompts_from_dicts(prompts: Iterable[dict]) -> list[PromptItem]:
    """`PromptItem`s from in-memory dicts in any input-line format (e.g. a task's prompts)."""
    return [parse_prompt_line(p, n) for n, p in enumerate(prompts, 1)]


# --------------------------------------------------------------------------- output
def scan_output(path: str | Path, *, repair: bool = True) -> set[str]:
    """Ids of the records already in `path` (empty if it does not exist).

    A last line that is incomplete or not JSON (the run was killed while writing it) is cut off
    when `repair` is true; a bad line anywhere else raises `RolloutError`: that is not a kill.
    """
    path = Path(path)
    if not path.exists():
        return set()
    ids: set[str] = set()
    good_end, bad = 0, None
    with open(path, "rb") as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            offset += len(raw)
            if bad is not None:  # a bad line followed by more lines
                raise RolloutError("not a JSON record (and not the last line)", where=f"{path}:{bad}")
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                record = None
            if raw.strip() and not (isinstance(record, dict) and "id" in record):
                bad = n
                continue
            if record is not None:
                ids.add(str(record["id"]))
            good_end = offset
        size = offset
    if bad is not None or good_end < size:
        if not repair:
            raise RolloutError("the last line is torn (re-run to repair)", where=f"{path}:{bad}")
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, size - good_end)
        with open(path, "rb+") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return ids


class JsonlAppender:
    """Appends one JSON record per line; each is flushed at once, fsync'd every `fsync_every`
    records (and on close), so a killed process loses at most the line it was writing."""

    def __init__(self, path: str | Path, *, fsync_every: int = 16):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_every = max(1, fsync_every)
        self._f = open(self.path, "ab")
        self._unsynced = 0

    def write(self, record: dict) -> None:
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._f.flush()
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._f.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self.sync()
            self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically (a temp file in the same folder, fsync, rename): a
    reader or a crash never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_records(path: str | Path, records: Iterable[dict]) -> None:
    """Write a whole record file (JSONL) atomically."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_records(path: str | Path) -> list[dict]:
    """All records of an output file (a torn last line is ignored, not repaired)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                records.append(json.loads(line))
    return records




@dataclass(frozen=True)
class Task:
    """One response to produce: sample j of a prompt, with its request fields."""

    item: PromptItem
    sample: int
    sampling: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.item.id}:{self.sample}"


def sample_seed(seed: int | None, prompt_id: str, sample: int) -> int | None:
    """A per-sample seed derived from the job seed: reruns repeat, samples differ.

    >>> sample_seed(0, "p", 0) == sample_seed(0, "p", 0) != sample_seed(0, "p", 1)
    True
    >>> sample_seed(None, "p", 0) is None
    True
    """
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}|{prompt_id}|{sample}".encode()).digest()[:4], "big") >> 1


def plan(items: Iterable[PromptItem], config: RolloutConfig) -> list[Task]:
    """Every (prompt, sample) of the job, with the request fields it is sampled with."""
    tasks = []
    for item in items:
        for j in range(item.samples or config.samples_per_prompt):
            sampling = {"temperature": config.temperature, "max_tokens": config.max_tokens} | item.sampling
            seed = sampling.pop("seed", config.seed)
            sampling["seed"] = sample_seed(seed, item.id, j)
            tasks.append(Task(item, j, sampling))
    return tasks


def make_record(task: Task, *, model: str, prompt_text: str, prompt_token_ids: list[int], response: str,
                response_token_ids: list[int], finish_reason: str | None, guidance: Any = None,
                usage: dict | None = None) -> dict[str, Any]:
    """One output record (the format `iro reward` and `iro train` read; see the module doc)."""
    item = task.item
    g = guidance
    record = {
        "id": task.id, "prompt_id": item.id, "sample": task.sample,
        **({"messages": item.messages} if item.messages is not None else {"prompt": item.prompt}),
        "prompt_text": prompt_text, "prompt_token_ids": list(prompt_token_ids),
        "response": response, "response_token_ids": list(response_token_ids),
        "finish_reason": finish_reason or "length",
        "policy": {"model": model, "value": g.value if g else None, "versions": list(g.versions) if g else [],
                   **{key: getattr(g, key, None) if g else None for key in SEARCH_FIELDS}},
        "sampling": {"temperature": task.sampling.get("temperature"), "max_tokens": task.sampling.get("max_tokens"),
                     "seed": task.sampling.get("seed")},
        "reward": None,
    }
    if usage is not None:
        record["usage"] = usage
    return record



class PromptRenderer:
    """`prompt_text` of a record: the prompt's token ids decoded with the base model's tokenizer
    (so chat prompts appear with their template), cached per prompt."""

    def __init__(self, tokenizer: str | None = None):
        self.path = tokenizer
        self._tokenizer: Any = None
        self._tried = False
        self._cache: dict[str, str] = {}

    def load(self, model_id: str) -> Any:
        """The tokenizer (loaded once; None when there is none for `model_id`)."""
        if not self._tried:
            self._tried = True
            path = self.path
            if path is None:
                from common.model_store import DEFAULT_MODEL_NAME, default_model_dir, prepare_default_model

                if model_id.split("+")[0] == DEFAULT_MODEL_NAME:  # only the tokenizer is needed: skip verifying
                    folder = default_model_dir()
                    path = str(folder if (folder / "tokenizer.json").is_file() else prepare_default_model())
            if path is not None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(path)
            else:
                log.warning("no tokenizer for model %r (pass --tokenizer): prompt_text is rendered without "
                            "the chat template", model_id)
        return self._tokenizer

    def __call__(self, item: PromptItem, token_ids: list[int], model_id: str) -> str:
        if item.id not in self._cache:
            tokenizer = self.load(model_id)
            if tokenizer is not None:
                text = tokenizer.decode(token_ids, skip_special_tokens=False)
            elif item.prompt is not None:
                text = item.prompt
            else:
                text = "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in item.messages)
            self._cache[item.id] = text
        return self._cache[item.id]




def record_from_response(task: Task, response: Any, render: PromptRenderer, *, record_usage: bool = False) -> dict:
    """The record of one chat/completion answer asked with `return_token_ids`."""
    choice = response.choices[0]
    prompt_ids = response.prompt_token_ids
    if prompt_ids and isinstance(prompt_ids[0], list):  # completions: one list per prompt
        prompt_ids = prompt_ids[0]
    if prompt_ids is None or choice.token_ids is None:
        raise RolloutError("the server returned no token ids (it must support `return_token_ids`)")
    text = choice.message.content if hasattr(choice, "message") else choice.text
    usage = response.usage.model_dump() if (record_usage and response.usage is not None) else None
    return make_record(task, model=response.model, prompt_text=render(task.item, prompt_ids, response.model),
                       prompt_token_ids=prompt_ids, response=text or "", response_token_ids=choice.token_ids,
                       finish_reason=choice.finish_reason, guidance=response.guidance, usage=usage)


@dataclass
class RolloutStats:
    total: int
    """Responses the job asks for."""
    skipped: int
    """Already in the output when the job started."""
    written: int = 0
    failed: int = 0
    completion_tokens: int = 0
    """Tokens the engine generated for the written responses (every candidate of a search)."""
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.skipped + self.written == self.total

    def summary(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        text = (f"{self.written} written, {self.skipped} already there, {self.failed} failed "
                f"({self.completion_tokens} tokens in {self.seconds:.1f} s, {rate:.0f} tok/s)")
        return text


def pending(items: list[PromptItem], out: str | Path, config: RolloutConfig) -> tuple[list[Task], RolloutStats]:
    """The tasks still missing from `out` (after repairing a torn last line) and fresh stats."""
    everything = plan(items, config)
    done = scan_output(out)
    if done:
        _check_same_job(out, {t.id: t for t in everything}, config)
    tasks = [t for t in everything if t.id not in done]
    return tasks, RolloutStats(total=len(everything), skipped=len(everything) - len(tasks))


def _check_same_job(out: str | Path, planned: dict[str, Task], config: RolloutConfig) -> None:
    """Refuse to resume into a file whose records were made by another policy or sampling."""
    with open(out, encoding="utf-8") as f:
        first = json.loads(f.readline())
    task = planned.get(str(first.get("id")))
    if task is None:
        return
    policy, sampling = first.get("policy") or {}, first.get("sampling") or {}
    have = {"value": (policy.get("value") or "").partition("@")[0] or None,
            **{k: sampling.get(k) for k in ("temperature", "max_tokens", "seed")}}
    want = {"value": (config.value or "").partition("@")[0] or None,
            **{k: task.sampling.get(k) for k in ("temperature", "max_tokens", "seed")}}
    if config.value is not None:  # only the search fields this job pins (and the records hold)
        for key, value in config.pinned().items():
            if key in policy:
                have[key], want[key] = policy[key], value
    diff = [f"{k}: {have[k]!r} there, {want[k]!r} now" for k in want if have[k] != want[k]]
    if diff:
        raise RolloutError(f"{out} already holds responses made otherwise ({'; '.join(diff)}); "
                           "write to a new file or delete it")



__all__ = ["CHAT_URL", "COMPLETIONS_URL", "JsonlAppender", "PromptItem", "PromptRenderer", "RolloutStats",
           "SEARCH_FIELDS", "Task", "make_record", "parse_prompt_line", "pending", "plan", "prompts_from_dicts",
           "read_prompts", "read_records", "record_from_response", "sample_seed", "scan_output", "write_atomic",
           "write_records"]
