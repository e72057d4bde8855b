"""Self-describing value checkpoints: `manifest.json` + `adapter.safetensors` + `head.safetensors`.

Only what was trained is stored (LoRA adapters and the head), as safetensors (never pickle).
The manifest carries the format version, the architecture needed to rebuild the model, the
backbone identity it must be used with, the value chain V_1..V_t with betas, default search
settings, training metadata, and a sha256 of every file, checked before anything is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from common.search_settings import SearchSettings
from registry.manifest import (MANIFEST, CheckpointError, VersionManifest, read_manifest_json,  # noqa: F401 (re-exported)
                               validate_manifest, verify_listed_files)
from valuefn.model import ValueModel, ValueModelConfig, sha256_file

FORMAT_VERSION = 2
"""2: `model.pooling` (mean by default). Format 1 knew the last token's value only, so a format-1
manifest reads as `pooling: last`; a format-1 reader refuses format 2 rather than misread it."""
ADAPTER_FILE = "adapter.safetensors"
HEAD_FILE = "head.safetensors"


class ChainLink(BaseModel):
    version: int = Field(ge=1)
    beta: float = Field(1.0, gt=0)


class Manifest(VersionManifest):
    backbone: dict[str, Any]
    model: ValueModelConfig
    head: dict[str, int] = Field(default_factory=lambda: {"in_features": 0, "out_features": 1})
    chain: list[ChainLink]
    defaults: SearchSettings = Field(default_factory=SearchSettings)
    """The value's search settings when a request sets none: `{"mode", "w", "k", "l", ...}`, the JSON of
    every format so far."""
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)


def write_checkpoint_files(model: ValueModel, directory: Path) -> dict[str, str]:
    """Write adapter + head safetensors into `directory`; return {file: sha256}."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.adapter_state_dict(), str(directory / ADAPTER_FILE))
    save_file(model.head_state_dict(), str(directory / HEAD_FILE))
    return {name: sha256_file(directory / name) for name in (ADAPTER_FILE, HEAD_FILE)}


def read_manifest(directory: Path) -> Manifest:
    path, raw, fmt = read_manifest_json(directory, FORMAT_VERSION)
    if fmt < 2 and isinstance(raw.get("model"), dict):
        raw["model"].setdefault("pooling", "last")
    return validate_manifest(Manifest, raw, path, directory)


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every listed file exists and matches its sha256; no pickle files are accepted."""
    verify_listed_files(directory, manifest.files, required=(ADAPTER_FILE, HEAD_FILE),
                        allowed=lambda name: name.endswith(".safetensors"),
                        refusal="only safetensors inside the checkpoint")


def check_backbone(manifest: Manifest, identity: dict[str, Any], directory: Path | None = None) -> None:
    for key in ("config_sha256", "tokenizer_sha256"):
        if manifest.backbone.get(key) != identity.get(key):
            raise CheckpointError(
                f"value {manifest.name} v{manifest.version} was trained for backbone {manifest.backbone.get('name')!r} "
                f"({key} differs from this server's base model {identity.get('name')!r})",
                reason="backbone_mismatch", path=directory)


def load_trained_tensors(directory: Path, manifest: Manifest) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    verify_files(directory, manifest)
    try:
        return load_file(str(directory / ADAPTER_FILE)), load_file(str(directory / HEAD_FILE))
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{directory}: unreadable safetensors: {exc}", reason="bad_file", path=directory) from exc


def build_value_model(backbone, manifest: Manifest, adapter, head, *, for_inference: bool = True) -> ValueModel:
    """Rebuild the value model of `manifest` on `backbone` (a fresh copy the model may own):
    LoRA merged into the weights for inference, peft adapters to train on otherwise."""
    try:
        if for_inference:
            return ValueModel.merged(backbone, manifest.model, adapter, head)
        model = ValueModel(backbone, manifest.model)
        model.load_trained(adapter, head)
        return model
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest.name} v{manifest.version}: weights do not fit the model: {exc}",
                              reason="shape_mismatch") from exc
