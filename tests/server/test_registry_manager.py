"""The watched-registry managers (values and policies) without an engine: a real registry in
`tmp_path`, tiny adapter files, fakes only for what needs vLLM or a backbone.

Pin, unpin, unload, refuse and reconcile behave the same for both kinds."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import save_file

from server.policies import PolicyManager
from valuefn.model import sha256_file
from valuefn.policies import ADAPTER_CONFIG, ADAPTER_WEIGHTS, POLICY_FORMAT_VERSION, PolicyRegistry

IDENTITY = {"name": "tiny", "config_sha256": "c" * 64, "tokenizer_sha256": "t" * 64}
RANK = 2


def publish_policy(registry: PolicyRegistry, name: str, *, corrupt: bool = False) -> int:
    """A new version of a rank-2 LoRA adapter (two small tensors; no model built)."""

    def write(d):
        save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 8),
                   "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, RANK)},
                  str(d / ADAPTER_WEIGHTS))
        (d / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": RANK, "target_modules": ["q_proj"]}))
        files = {f: sha256_file(d / f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
        return {k: ("0" * 64 if corrupt and k == ADAPTER_WEIGHTS else v) for k, v in files.items()}

    manifest = {"format_version": POLICY_FORMAT_VERSION, "name": name, "version": 1, "base": IDENTITY,
                "method": "apa", "lora_rank": RANK}
    return registry.publish_adapter(name, write, manifest)


@pytest.mark.xfail(strict=True, reason="issue 26: the watcher's reconcile undoes a policy pin")
async def test_a_pinned_policy_version_survives_the_watchers_reconcile_and_load_without_version_unpins(tmp_path):
    """Issue 26's bug: `load {"version": 1}` answered 200, then the watcher served CURRENT (v2)
    again within a second; `load {}` did not unpin."""
    registry = PolicyRegistry(tmp_path)
    publish_policy(registry, "pin")
    publish_policy(registry, "pin")
    manager = PolicyManager(registry, identity=IDENTITY, base_id="tiny", max_lora_rank=8)
    await manager.reconcile()
    assert manager.served["pin"].version == 2

    await manager.load("pin", 1, pin=True)
    await manager.reconcile()  # what the watcher does on every registry change
    assert manager.served["pin"].version == 1
    status = manager.status("pin")
    assert status["served_version"] == 1 and status["pinned"]

    await manager.load("pin")  # load {}: follow CURRENT again
    assert manager.served["pin"].version == 2 and not manager.status("pin")["pinned"]
    publish_policy(registry, "pin")  # and the watcher follows a new CURRENT
    await manager.reconcile()
    assert manager.served["pin"].version == 3
