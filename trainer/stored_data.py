"""Stored completions as training data: read them from a server (`GET /v1/chat/completions`, the
openai SDK), turn them into rollout records (the format `iro reward` and `iro train` read; see
`trainer.rollout`) or into the prompts of the next iteration, deduplicated, with a held-out split
that never moves (a prompt's side is a hash of its messages).

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)
    stored = list_stored(client, metadata={"task": "support"})
    records = [r for c in stored for r in to_records(c)]
    train, heldout = split_prompts(stored, heldout_fraction=0.1)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def parse_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """`["k=v", ...]` as a dict; ValueError naming a pair without `=`.

    >>> parse_pairs(["task=support", "lang=en"])
    {'task': 'support', 'lang': 'en'}
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        out[key] = value
    return out


def list_stored(client, *, metadata: dict[str, str] | None = None, model: str | None = None,
                since: int | None = None, limit: int | None = None) -> list[Any]:
    """Stored completions (oldest first) matching the filters; `since`: created at or after this
    Unix time; `limit`: at most this many."""
    params: dict[str, Any] = {"order": "asc", "limit": 100}
    if metadata:
        params["metadata"] = metadata
    if model:
        params["model"] = model
    out = []
    for completion in client.chat.completions.list(**params):  # the SDK follows `after` page by page
        if since is not None and completion.created < since:
            continue
        out.append(completion)
        if limit is not None and len(out) >= limit:
            break
    return out


def _extra(completion, name: str, default=None):
    """A field of the stored object the SDK's type may not declare (iro extensions, metadata)."""
    value = getattr(completion, name, None)
    if value is None:
        value = (completion.model_extra or {}).get(name)
    return default if value is None else value


def metadata_of(completion) -> dict[str, str]:
    return dict(_extra(completion, "metadata") or {})


def to_records(completion) -> list[dict]:
    """One rollout record per choice of a stored completion (token ids as the engine produced them)."""
    request = _extra(completion, "request") or {}
    policy = _extra(completion, "policy") or {}
    records = []
    for choice in completion.choices:
        token_ids = (choice.model_extra or {}).get("token_ids") or []
        records.append({
            "id": f"{completion.id}:{choice.index}", "prompt_id": completion.id, "sample": choice.index,
            "messages": request.get("messages"), "prompt_text": _extra(completion, "prompt_text"),
            "prompt_token_ids": _extra(completion, "prompt_token_ids") or [],
            "response": choice.message.content or "", "response_token_ids": token_ids,
            "finish_reason": choice.finish_reason or "length",
            "policy": {"model": completion.model, "value": policy.get("value"), "versions": policy.get("versions", []),
                       **{k: policy.get(k) for k in ("mode", "w", "k", "l", "betas", "adapter")}},
            "sampling": {"temperature": request.get("temperature"),
                         "max_tokens": request.get("max_completion_tokens") or request.get("max_tokens"),
                         "seed": request.get("seed")},
            "reward": None, "metadata": _extra(completion, "metadata") or {}, "created": completion.created,
        })
    return records


def prompt_key(messages: list[dict]) -> str:
    """A prompt's identity: the sha256 of its messages (role and content only)."""
    canonical = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def is_heldout(key: str, fraction: float) -> bool:
    """Whether the prompt with this key belongs to the held-out split (stable across runs).

    >>> is_heldout("0" * 64, 0.1), is_heldout("f" * 64, 0.1)
    (True, False)
    """
    return int(key[:8], 16) / 0x100000000 < fraction


def split_prompts(completions: Iterable[Any], *, heldout_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """Deduplicated prompts (`{"id", "messages"}`, the rollout job's input) of stored completions,
    as (train, held-out); the system/user turns only, without the stored answer."""
    seen: set[str] = set()
    train, heldout = [], []
    for completion in completions:
        messages = (_extra(completion, "request") or {}).get("messages")
        if not messages:
            continue
        key = prompt_key(messages)
        if key in seen:
            continue
        seen.add(key)
        item = {"id": key[:16], "messages": messages}
        (heldout if is_heldout(key, heldout_fraction) else train).append(item)
    return train, heldout


def write_jsonl(path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def stored_task(task, client, *, metadata: dict[str, str] | None = None, model: str | None = None,
                since: int | None = None, heldout_fraction: float = 0.1):
    """`task` with its training prompts replaced by the deduplicated prompts of stored
    completions (online IRO: served traffic becomes the next iteration's rollout prompts) and its
    held-out prompts by the stored held-out split (the task's own when that split is empty); the
    task's reward, stop strings and search stay. ValueError when no stored prompt matches."""
    from dataclasses import replace

    from trainer.rollout_records import prompts_from_dicts

    train, heldout = split_prompts(list_stored(client, metadata=metadata, model=model, since=since),
                                   heldout_fraction=heldout_fraction)
    if not train:
        raise ValueError(f"no stored completion matches (metadata {metadata or {}}, model {model}, since {since}): "
                         "nothing to train on; serve requests with store: true first")

    def items(rows):
        stop = {"stop": list(task.stop)} if task.stop else {}
        return tuple(replace(item, sampling={**stop, **item.sampling}) for item in prompts_from_dicts(rows))

    return replace(task, source=f"stored completions ({task.source})", train=items(train),
                   eval=items(heldout) if heldout else task.eval)
