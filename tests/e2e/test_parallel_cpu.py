"""vLLM's CPU engine under tensor parallelism (issue 24, item 4), built by our recipe
(`common.engine_args.engine_kwargs`: one core list per rank) with our worker extension.

A tiny random Llama whose 4 attention heads (64 wide, as the CPU attention kernels need) and 2 KV
heads divide by 2, on 2 ranks: greedy text equals Hugging Face's, and engine values (a head on the
final hidden state, and one on the residual stream after layer 1) equal the same heads on Hugging
Face's hidden states: the hidden states a TP rank sees after the all-reduce are the whole model's,
and the output handed back (TP rank 0's) carries them. The engine runs in a subprocess (this file's
`main`), as vLLM spawns its own processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

PROMPT = [1, 17, 42, 99, 7, 3]
NEW_TOKENS = 6


def main(model_dir: str, tensor_parallel_size: int) -> None:
    import asyncio

    import numpy as np

    from common.engine_args import EngineSettings, engine_kwargs, prepare_engine_process
    from server.vllm_ext.wire import VALUE_HEADS_ARG, VALUE_LAYERS_ARG, encode_heads, token_values
    from server.vllm_ext.worker import REPORT_METHOD, WORKER_EXTENSION, combine

    async def run() -> dict:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.async_llm import AsyncLLM

        settings = EngineSettings(max_model_len=256, kv_cache_gib=1, block_size=16, enforce_eager=True, dtype="float32",
                                  engine_threads="all", tensor_parallel_size=tensor_parallel_size,
                                  engine_value_layers="1")
        prepare_engine_process(settings)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_dir, disable_log_stats=True,
                                                        **engine_kwargs(settings),
                                                        worker_extension_cls=WORKER_EXTENSION))
        try:
            reports = await llm.collective_rpc(REPORT_METHOD)
            hidden = llm.model_config.hf_config.hidden_size
            heads = np.random.default_rng(0).normal(size=(1, hidden + 1)) / hidden ** 0.5
            out = {"workers": len(reports), "report": combine(reports), "heads": heads.tolist(),
                   "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}
            for key, layers in (("final", None), ("layer1", [1])):
                extra = {VALUE_HEADS_ARG: encode_heads(heads)} | ({VALUE_LAYERS_ARG: layers} if layers else {})
                params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0, extra_args=extra,
                                        ignore_eos=True)
                async for final in llm.generate(TokensPrompt(prompt_token_ids=PROMPT), params, key):
                    pass
                completion = final.outputs[0]
                out[key] = {"tokens": list(completion.token_ids),
                            "values": [v[0] for v in token_values(completion.logprobs, 1)]}
            return out
        finally:
            llm.shutdown()

    print("RESULT " + json.dumps(asyncio.run(run())), flush=True)


def hf_reference(model_dir: Path, tokens: list[int], heads: list[list[float]]) -> dict:
    """Greedy tokens, and the heads on the final normed state and on the stream after layer 1, at the
    positions that sampled each new token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                min_new_tokens=NEW_TOKENS)[0, len(PROMPT):].tolist()
        ids = torch.tensor([PROMPT + tokens[:-1]])
        states = model.model(ids, output_hidden_states=True)
    w = torch.tensor(heads, dtype=torch.float32)  # (1, H + 1)
    rows = slice(len(PROMPT) - 1, len(PROMPT) - 1 + len(tokens))
    layer1 = states.hidden_states[1][0, rows]
    layer1 = layer1 * torch.rsqrt(layer1.pow(2).mean(-1, keepdim=True) + 1e-6)
    final = states.last_hidden_state[0, rows]
    return {"tokens": greedy, "final": (final @ w[0, :-1] + w[0, -1]).tolist(),
            "layer1": (layer1 @ w[0, :-1] + w[0, -1]).tolist()}


def test_tensor_parallel_2_on_the_cpu_engine_samples_and_computes_engine_values(tmp_path):
    from tests.conftest import make_tiny_llama

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallel 2 on CPU needs 2 cores (one per rank)")
    model_dir = make_tiny_llama(tmp_path / "tiny-tp", hidden=256, vocab=256)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    proc = subprocess.run([sys.executable, __file__, str(model_dir), "2"], capture_output=True, text=True, timeout=420,
                          env=env, cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["workers"] == 2 and got["bind"] == "0|1"  # two TP ranks, each on its own core
    assert got["report"]["value_heads"] == "installed", got["report"]
    want = hf_reference(model_dir, got["final"]["tokens"], got["heads"])
    assert got["final"]["tokens"] == got["layer1"]["tokens"] == want["tokens"]
    for key in ("final", "layer1"):
        assert got[key]["values"] == pytest.approx(want[key], rel=1e-3, abs=1e-3), key


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
