"""The rollout job through the server's Batch API (`iro rollout --via-batch`): the job needs
nothing but the server's URL. Every pending (prompt, sample) becomes one line of a batch input
file (`custom_id` = the record id), uploaded with `/v1/files`, run by `/v1/batches` beside the
server's interactive traffic, and the output file's answers become the same records as the HTTP
path writes (`trainer.rollout.record_from_response`). The batch id is kept beside the output (`<out>.batch`): a
re-run after an interruption waits for that batch instead of submitting the work again. Once the
records are written, the batch's input, output and error files are deleted from the server (they
count against the key's file quota, `max_files_per_key`), unless `keep_batch_files` is set.

Needs the `openai` package (the Batch API's client).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from common.protocol import ChatCompletionResponse, CompletionResponse
from trainer.rollout_config import RolloutConfig, RolloutError
from trainer.rollout_records import CHAT_URL, COMPLETIONS_URL, JsonlAppender, PromptItem, RolloutStats, pending

log = logging.getLogger(__name__)
TERMINAL = ("completed", "failed", "expired", "cancelled")


def _client(config: RolloutConfig):
    import openai

    return openai.OpenAI(base_url=config.server.rstrip("/") + "/v1", api_key=config.api_key or "none",
                         timeout=config.timeout, max_retries=config.max_retries)


def batch_lines(tasks, model: str, guidance: dict | None) -> list[dict]:
    """One batch input line per task (chat or completion, as its prompt is)."""
    lines = []
    for t in tasks:
        body = {**t.item.body(), "model": model, "return_token_ids": True,
                **({"guidance": guidance} if guidance else {}), **{k: v for k, v in t.sampling.items() if v is not None}}
        lines.append({"custom_id": t.id, "method": "POST", "body": body,
                      "url": CHAT_URL if t.item.messages is not None else COMPLETIONS_URL})
    return lines


def run_rollout_via_batch(items: list[PromptItem], out: str | Path, config: RolloutConfig, *,
                          record: Callable[[Any, Any], dict], client: Any = None,
                          poll_interval: float = 2.0) -> RolloutStats:
    """Sample every missing (prompt, sample) of `items` into `out` through one batch; `record(task,
    answer)` makes a task's record of its answer (`trainer.rollout.record_from_response`). A refusal
    of the Batch API (auth, unknown model, a file it cannot take) is a `RolloutError`."""
    try:
        import openai
    except ImportError:
        raise RolloutError("--via-batch needs the openai package (pip install openai)") from None
    try:
        return _run(items, out, config, record, client, poll_interval)
    except openai.APIStatusError as exc:
        raise RolloutError(f"the server's Batch API answered {exc.status_code}: {exc.message}") from None
    except openai.APIConnectionError as exc:
        raise RolloutError(f"cannot reach the server's Batch API at {config.server}: {exc}") from None


def _run(items, out, config, record, client, poll_interval) -> RolloutStats:
    tasks, stats = pending(items, out, config)
    if not tasks:
        return stats
    client = client or _client(config)
    model = config.model or next(m.id for m in client.models.list().data if not (m.model_extra or {}).get("parent"))
    lines = batch_lines(tasks, model, config.guidance())
    endpoints = {line["url"] for line in lines}
    if len(endpoints) > 1:
        raise RolloutError("a batch runs one endpoint: give only chat prompts or only completion prompts")
    sidecar = Path(str(out) + ".batch")
    start = time.perf_counter()
    batch = _resume(client, sidecar, {t.id for t in tasks})
    if batch is None:
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = client.files.create(file=(Path(out).name + ".in.jsonl", data), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoints.pop(), completion_window="24h",
                                      metadata={"iro": "rollout", "out": Path(out).name[:500]})
        sidecar.write_text(json.dumps({"batch_id": batch.id, "ids": sorted(t.id for t in tasks)}))
    log.info("rollout via batch %s: %d requests", batch.id, len(tasks))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="rollout (batch)", unit="resp", disable=not config.progress, dynamic_ncols=True)
    while batch.status not in TERMINAL:
        time.sleep(poll_interval)  # polling the batch, as any Batch API client does
        batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        if counts is not None:
            bar.update(counts.completed + counts.failed - bar.n)
    bar.close()
    by_id = {t.id: t for t in tasks}
    with JsonlAppender(out, fsync_every=config.fsync_every) as sink:
        for line in _lines(client, batch.output_file_id):
            task = by_id.get(line["custom_id"])
            body = (line.get("response") or {}).get("body") or {}
            if task is None:
                continue
            kind = ChatCompletionResponse if "chat.completion" == body.get("object") else CompletionResponse
            answer = kind.model_validate(body)
            sink.write(record(task, answer))
            stats.written += 1
            stats.completion_tokens += answer.usage.completion_tokens if answer.usage else 0
    for line in _lines(client, batch.error_file_id):
        stats.failed += 1
        error = ((line.get("response") or {}).get("body") or {}).get("error") or line.get("error")
        stats.errors.append(f"{line['custom_id']}: {error}")
    stats.seconds = time.perf_counter() - start
    if batch.status != "completed":
        stats.errors.append(f"batch {batch.id} ended {batch.status}: {batch.errors}")
    sidecar.unlink(missing_ok=True)
    if not config.keep_batch_files:
        _delete_files(client, batch)
    return stats


def _delete_files(client, batch) -> None:
    """Delete the batch's files once its answers are in the rollout file; a file that cannot be deleted
    is logged (the records are safe, only the quota is not freed)."""
    import openai

    for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        try:
            client.files.delete(file_id)
        except openai.APIError as exc:
            log.warning("rollout via batch %s: could not delete file %s (%s); it counts against the key's file "
                        "quota until deleted (iro data / DELETE /v1/files/%s)", batch.id, file_id, exc, file_id)


def _resume(client, sidecar: Path, ids: set[str]):
    """The batch an interrupted run submitted for exactly these tasks, unless it ended badly."""
    if not sidecar.exists():
        return None
    saved = json.loads(sidecar.read_text())
    if set(saved.get("ids", [])) != ids:
        return None
    batch = client.batches.retrieve(saved["batch_id"])
    return batch if batch.status not in ("failed", "expired", "cancelled") else None


def _lines(client, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]
