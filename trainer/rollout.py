"""Rollout job: sample responses to prompts through the server, one JSONL record per response.

    iro rollout prompts.jsonl -o rollouts.jsonl --samples-per-prompt 4 --concurrency 8
    iro rollout prompts.jsonl -o guided.jsonl --value review@2 --mode cbs --w 4 --k 4 --l 8

Input lines (JSONL): `{"id"?, "messages": [...]}` (chat), `{"id"?, "prompt": "..."}` (completion),
or OpenAI batch-file lines `{"custom_id", "method", "url", "body"}` whose body holds messages or
prompt and sampling fields (`SAMPLING_KEYS`: the fields of `common.sampling.Sampling` that requests
carry, e.g. temperature, top_p, min_p, stop, seed, and max_tokens; and n); a line's fields win over
the command line's, `n` sets that prompt's number of samples. Lines without an id are named by
their line number.

Every response becomes one output record, the format `iro reward` and `iro train` read:

    {"id": "<prompt_id>:<j>", "prompt_id", "sample": j, "messages" | "prompt", "prompt_text",
     "prompt_token_ids", "response", "response_token_ids", "finish_reason",
     "policy": {"model", "value", "versions", "mode", "w", "k", "l", ...every search field},
     "sampling": {"temperature", "max_tokens", "seed"}, "reward": null}

The job is resumable: records are appended and flushed as each response arrives (fsync'd every
few records and at the end), a re-run skips ids already in the output, and a last line torn by a
kill is cut off first. Token ids are the engine's own (`return_token_ids`), never re-tokenised.
`--backend ray` runs the same job as offline vLLM batch generation on Ray (base model only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.rollout_config import DEFAULT_SERVER, SAMPLING_KEYS, RolloutConfig, RolloutError
from trainer.rollout_records import (
    JsonlAppender, PromptItem, PromptRenderer, RolloutStats, Task, make_record, parse_prompt_line, pending, plan,
    prompts_from_dicts, read_prompts, read_records, record_from_response, sample_seed, scan_output, write_atomic,
    write_records,
)

log = logging.getLogger(__name__)


#: Errors after which every other request would fail too: stop at once.
_FATAL_STATUS = (401, 403, 404)


async def arun_rollout(items: list[PromptItem], out: str | Path, config: RolloutConfig, *,
                       client: Any = None) -> RolloutStats:
    """Sample every missing (prompt, sample) of `items` into `out` through the server.

    Responses are appended as they complete (any order). A request that fails after the
    client's retries is counted in `stats.failed` and left for a re-run; authentication
    errors and unknown models/values stop the job (`APIStatusError`).
    """
    from clients import AsyncIroClient

    tasks, stats = pending(items, out, config)
    if not tasks:
        return stats
    owned = client is None
    if owned:
        client = AsyncIroClient(config.server, api_key=config.api_key, model=config.model, timeout=config.timeout,
                                max_retries=config.max_retries)
    try:
        return await _sample(client, tasks, stats, out, config)
    finally:
        if owned:
            await client.aclose()


async def _sample(client: Any, tasks: list[Task], stats: RolloutStats, out: str | Path,
                  config: RolloutConfig) -> RolloutStats:
    from tqdm.auto import tqdm

    from clients.errors import APIStatusError

    guidance = config.guidance()
    model = config.model
    if model is None:  # ask once, not once per worker
        model = next((card.id for card in (await client.models()).data if card.parent is None), None)
    render = PromptRenderer(config.tokenizer)
    await asyncio.to_thread(render.load, model or "")

    def requests() -> Iterator[dict]:
        for t in tasks:
            yield {**t.item.body(), "model": model, "guidance": guidance, "return_token_ids": True,
                   **{k: v for k, v in t.sampling.items() if v is not None}}

    start = time.perf_counter()
    bar = tqdm(total=len(tasks), desc="rollout", unit="resp", disable=not config.progress, dynamic_ncols=True)
    try:
        with JsonlAppender(out, fsync_every=config.fsync_every) as sink:
            async for index, answer in client.generate_many(requests(), concurrency=config.concurrency,
                                                            return_exceptions=True):
                task = tasks[index]
                if isinstance(answer, Exception):
                    if isinstance(answer, APIStatusError) and answer.status_code in _FATAL_STATUS:
                        raise answer
                    stats.failed += 1
                    stats.errors.append(f"{task.id}: {answer}")
                    log.warning("rollout %s failed: %s", task.id, answer)
                else:
                    sink.write(record_from_response(task, answer, render, record_usage=config.record_usage))
                    stats.written += 1
                    stats.completion_tokens += answer.usage.completion_tokens if answer.usage else 0
                bar.update(1)
                rate = stats.completion_tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{rate:.0f}", failed=stats.failed)
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    return stats


def run_rollout(items: list[PromptItem], out: str | Path, config: RolloutConfig, **kw: Any) -> RolloutStats:
    """`arun_rollout` for synchronous callers, or the Ray backend when `config.backend == "ray"`."""
    if config.backend == "ray":
        from trainer.rollout_ray import run_rollout_ray

        return run_rollout_ray(items, out, config, **kw)
    if config.backend == "batch":
        from trainer.rollout_batch import run_rollout_via_batch

        render = PromptRenderer(config.tokenizer)
        return run_rollout_via_batch(items, out, config, **kw, record=lambda task, answer: record_from_response(
            task, answer, render, record_usage=config.record_usage))
    return asyncio.run(arun_rollout(items, out, config, **kw))


# The job's config and files live in trainer.rollout_config and trainer.rollout_records (which the
# Ray backend imports too); they are re-exported here, where callers look for the job.
__all__ = ["DEFAULT_SERVER", "SAMPLING_KEYS", "JsonlAppender", "PromptItem", "PromptRenderer", "RolloutConfig", "RolloutError",
           "RolloutStats", "Task", "arun_rollout", "make_record", "parse_prompt_line", "pending", "plan",
           "prompts_from_dicts", "read_prompts", "read_records", "record_from_response", "run_rollout", "sample_seed",
           "scan_output", "write_atomic", "write_records"]
