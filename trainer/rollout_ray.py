"""`iro rollout --backend ray`: the rollout job as offline vLLM batch generation on Ray Data.

One vLLM `LLM` per Ray actor samples the base model; records stream back to the driver, which
appends them with the same format and resume rules as the server backend (`trainer.rollout`).
Value guidance lives in the server, so this backend samples the base model only. Ray is an
optional extra: `pip install 'iro-serve[ray]'`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.rollout_config import SAMPLING_KEYS, RolloutConfig, RolloutError
from trainer.rollout_records import JsonlAppender, PromptItem, RolloutStats, make_record, pending


def run_rollout_ray(items: list[PromptItem], out: str | Path, config: RolloutConfig, *, model: str | None = None,
                    replicas: int = 1, batch_size: int = 64) -> RolloutStats:
    """The same job as offline vLLM batch generation on Ray Data (one vLLM `LLM` per replica),
    streaming records into `out` with the same resume rules. Samples the base model only: value
    guidance lives in the server. Needs the `ray` extra (`pip install 'iro-serve[ray]'`)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RolloutError("--backend ray needs Ray, an optional extra: pip install 'iro-serve[ray]' "
                           "(or use the default --backend server)") from exc
    if config.value is not None:
        raise RolloutError("--backend ray samples the base model only; value-guided rollouts need the server "
                           "(drop --value or use --backend server)")
    import torch

    from common.model_store import resolve_model
    from common.engine_args import EngineSettings

    model_path = str(resolve_model(model or config.model))
    tasks, stats = pending(items, out, config)
    if not tasks:
        return stats
    rows = [{"index": i, "messages": json.dumps(t.item.messages) if t.item.messages is not None else None,
             "prompt": t.item.prompt, "sampling": json.dumps(t.sampling)} for i, t in enumerate(tasks)]
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    engine = EngineSettings().engine_options()  # the server's engine settings (IRO_* variables included)
    dataset = ray.data.from_items(rows).map_batches(
        _VllmSampler, fn_constructor_kwargs={"model_path": model_path, "engine": engine},
        batch_size=batch_size, concurrency=replicas, num_gpus=1 if torch.cuda.is_available() else 0)
    start = time.perf_counter()
    with JsonlAppender(out, fsync_every=config.fsync_every) as sink:
        for row in dataset.iter_rows():
            task = tasks[int(row["index"])]
            response_ids = [int(x) for x in row["response_token_ids"]]  # Ray hands back numpy arrays
            sink.write(make_record(task, model=os.path.basename(model_path), prompt_text=str(row["prompt_text"]),
                                   prompt_token_ids=[int(x) for x in row["prompt_token_ids"]],
                                   response=str(row["response"]), response_token_ids=response_ids,
                                   finish_reason=str(row["finish_reason"])))
            stats.written += 1
            stats.completion_tokens += len(response_ids)
    stats.seconds = time.perf_counter() - start
    return stats


def sampling_params_kwargs(sampling: dict[str, Any]) -> dict[str, Any]:
    """A task's request fields (`trainer.rollout_config.SAMPLING_KEYS`, which vLLM's `SamplingParams`
    names alike) as `SamplingParams` keyword arguments, with the server's defaults for the rest.

    >>> sampling_params_kwargs({"temperature": 0.7, "max_tokens": 8, "logit_bias": {"42": -5}, "seed": None})
    {'temperature': 0.7, 'max_tokens': 8, 'logit_bias': {42: -5}, 'top_p': 1.0, 'top_k': -1}
    """
    kwargs = {k: v for k, v in sampling.items() if k in SAMPLING_KEYS and v is not None}
    if "logit_bias" in kwargs:  # JSON keys are text
        kwargs["logit_bias"] = {int(token): bias for token, bias in kwargs["logit_bias"].items()}
    kwargs.setdefault("temperature", 1.0)
    kwargs.setdefault("top_p", 1.0)
    kwargs["top_k"] = kwargs.get("top_k") or -1  # 0 (every token) is -1 to vLLM
    return kwargs


class _VllmSampler:
    """Ray Data callable class: one offline vLLM engine per actor, a batch of rows per call."""

    def __init__(self, model_path: str, engine: dict[str, Any]):
        from vllm import LLM

        from common.engine_args import EngineSettings, engine_kwargs, prepare_engine_process

        settings = EngineSettings(**engine)
        prepare_engine_process(settings)
        self.llm = LLM(model=model_path, **engine_kwargs(settings))
        self.tokenizer = self.llm.get_tokenizer()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams

        prompts, params = [], []
        for messages, prompt, sampling in zip(batch["messages"], batch["prompt"], batch["sampling"]):
            s = json.loads(sampling)
            if messages is not None:  # rendered as the server renders it (server.openai.serving)
                text = self.tokenizer.apply_chat_template(json.loads(messages), add_generation_prompt=True,
                                                          tokenize=False)
            else:
                text = prompt
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt_token_ids": list(ids)})
            params.append(SamplingParams(n=1, **sampling_params_kwargs(s)))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return {
            "index": batch["index"],
            "prompt_text": [self.tokenizer.decode(p["prompt_token_ids"]) for p in prompts],
            "prompt_token_ids": [p["prompt_token_ids"] for p in prompts],
            "response": [o.outputs[0].text for o in outputs],
            "response_token_ids": [list(o.outputs[0].token_ids) for o in outputs],
            "finish_reason": [o.outputs[0].finish_reason or "length" for o in outputs],
        }


__all__ = ["run_rollout_ray", "sampling_params_kwargs"]
