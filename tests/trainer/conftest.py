"""Fixtures for the trainer tests: a tiny random Llama backbone and synthetic labelled rollouts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama

SPECIAL = 7  # the token whose share of a response is the synthetic reward


def build_tiny_llama(path: Path, *, hidden: int = 32, layers: int = 2, vocab: int = 64, seed: int = 0) -> Path:
    """A tiny random Llama whose pad token is its EOS (like SmolLM2), saved as a HF folder."""
    return make_tiny_llama(path, hidden=hidden, layers=layers, vocab=vocab, seed=seed, pad_is_eos=True,
                           max_positions=256)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models are latency-bound: one thread is much faster than two on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def synthetic_records(n_prompts: int = 40, samples: int = 4, seed: int = 0, vocab: int = 64) -> list[dict]:
    """Rollout records whose reward is the share of SPECIAL tokens in the response (a known answer).
    Prompts end with the pad/eos id 2 as chat turns do, so pad-id searches would go wrong."""
    rng = random.Random(seed)
    records = []
    for p in range(n_prompts):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(3, 8))] + [2] + [rng.randrange(3, vocab)]
        for j in range(samples):
            share = rng.random()
            response = [SPECIAL if rng.random() < share else rng.choice([t for t in range(3, vocab) if t != SPECIAL])
                        for _ in range(rng.randint(4, 12))]
            records.append({
                "id": f"p{p}:{j}", "prompt_id": f"p{p}", "sample": j, "prompt": f"prompt {p}", "prompt_text": "",
                "prompt_token_ids": prompt, "response": " ".join(f"w{t}" for t in response),
                "response_token_ids": response, "finish_reason": "length",
                "policy": {"model": "tiny", "value": None, "versions": [], "mode": None, "w": None, "k": None, "l": None},
                "sampling": {"temperature": 1.0, "max_tokens": 12, "seed": seed},
                "reward": response.count(SPECIAL) / len(response),
            })
    return records
