"""Tiny policy versions (no model): an adapter file of chosen bytes and a LoRA config."""

from __future__ import annotations

import json
from pathlib import Path

from common.hashing import sha256_file
from registry.policies import ADAPTER_CONFIG, ADAPTER_WEIGHTS, POLICY_FORMAT_VERSION


def publish(registry, name: str, payload: bytes, **kw) -> int:
    def write(d: Path) -> dict[str, str]:
        (d / ADAPTER_WEIGHTS).write_bytes(payload)
        (d / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        return {f: sha256_file(d / f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}

    manifest = {"format_version": POLICY_FORMAT_VERSION, "name": name, "version": 1, "base": {"name": "tiny"},
                "method": "apa", "lora_rank": 4, "training": {"payload": payload.decode(errors="replace")}}
    return registry.publish(name, write, manifest, **kw)
