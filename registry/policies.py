"""The policy registry: distilled LoRA policy adapters of the frozen base model, versioned like values.

    POLICIES_DIR/<name>/v0001/{manifest.json, adapter_model.safetensors, adapter_config.json}
    POLICIES_DIR/<name>/CURRENT

A version folder is a peft/vLLM LoRA adapter folder as it stands (vLLM's `LoRARequest` loads it
directly) plus our manifest: the base model identity it was trained on, the method and its
hyper-parameters, the data and the held-out metrics, and a sha256 of every file. Publishing,
CURRENT, rollback, pruning and the stores (a folder or `s3://bucket/prefix`) are
`registry.base.BaseRegistry`'s; only the manifest and the file rules differ: weights are
safetensors only, and the one other file allowed is peft's `adapter_config.json` (plain JSON,
parsed and checked, never executed).

    >>> import tempfile; PolicyRegistry(tempfile.mkdtemp()).names()
    []
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from common.hashing import sha256_file
from registry.base import BaseRegistry
from registry.errors import CheckpointError
from registry.manifest import VersionManifest, read_manifest_json, validate_manifest, verify_listed_files

if TYPE_CHECKING:
    import torch

POLICY_FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METHODS = ("apa", "is-dpo", "is-ipo")


def default_policies_dir() -> Path | str:
    """`IRO_POLICIES_DIR` (a folder or an `s3://` URL), else `$IRO_HOME/policies` (IRO_HOME
    defaults to ~/.cache/iro)."""
    from registry.open import is_object_store

    if os.environ.get("IRO_POLICIES_DIR"):
        location = os.environ["IRO_POLICIES_DIR"]
        return location if is_object_store(location) else Path(location).expanduser()
    return Path(os.environ.get("IRO_HOME", Path.home() / ".cache" / "iro")).expanduser() / "policies"


class PolicyManifest(VersionManifest):
    base: dict[str, Any]
    """Identity of the base model the adapter was trained on (`valuefn.model.backbone_identity`)."""
    method: Literal["apa", "is-dpo", "is-ipo"]
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    """The method's (lambda; beta, clip_eps) and the LoRA shape (r, alpha, target modules)."""
    lora_rank: int = Field(ge=1)
    training: dict[str, Any] = Field(default_factory=dict)
    """Data file, config, seed, steps, wall time."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)


def read_policy_manifest(directory: Path) -> PolicyManifest:
    path, raw, _ = read_manifest_json(directory, POLICY_FORMAT_VERSION, "policy format")
    return validate_manifest(PolicyManifest, raw, path, directory)


def verify_policy_files(directory: Path, manifest: PolicyManifest) -> None:
    """The adapter weights and config exist, match their sha256, and are nothing else."""
    verify_listed_files(directory, manifest.files, required=(ADAPTER_WEIGHTS, ADAPTER_CONFIG),
                        allowed=lambda name: name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG),
                        refusal=f"only {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")


def check_base(manifest: PolicyManifest, identity: dict[str, Any], directory: Path | None = None) -> None:
    for key in ("config_sha256", "tokenizer_sha256"):
        if manifest.base.get(key) != identity.get(key):
            raise CheckpointError(
                f"policy {manifest.name} v{manifest.version} was trained on base {manifest.base.get('name')!r} "
                f"({key} differs from this base model {identity.get('name')!r})", reason="base_mismatch",
                path=directory)


def check_adapter(directory: Path, manifest: PolicyManifest) -> dict[str, torch.Tensor]:
    """Hashes verified, then the weights themselves: readable safetensors, finite, of the manifest's
    rank, and a config that is a LoRA config of that rank. Returns the tensors."""
    import torch
    from safetensors.torch import load_file

    verify_policy_files(directory, manifest)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as exc:  # json and safetensors raise their own error types
        raise CheckpointError(f"{directory}: unreadable adapter: {exc}", reason="bad_file", path=directory) from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or config.get("r") != manifest.lora_rank:
        raise CheckpointError(f"{directory}: {ADAPTER_CONFIG} is not a LoRA config of rank {manifest.lora_rank}",
                              reason="bad_manifest", path=directory)
    if not tensors:
        raise CheckpointError(f"{directory}: the adapter holds no weights", reason="bad_file", path=directory)
    for key, tensor in tensors.items():
        if "lora_A" in key and tensor.shape[0] != manifest.lora_rank or "lora_B" in key and tensor.shape[1] != manifest.lora_rank:
            raise CheckpointError(f"{directory}: {key} has shape {tuple(tensor.shape)}, not rank {manifest.lora_rank}",
                                  reason="shape_mismatch", path=directory)
        if not torch.isfinite(tensor.float()).all():
            raise CheckpointError(f"{directory}: {key} holds non-finite numbers", reason="bad_values", path=directory)
    return tensors


class PolicyRegistry(BaseRegistry):
    """The registry of policy adapters: no chains, a `PolicyManifest`, adapter files only.
    `open_registry(location, PolicyRegistry)` opens one in a folder or at `s3://bucket/prefix`."""

    kind = "policy"

    def _read_manifest(self, directory: Path) -> PolicyManifest:
        return read_policy_manifest(directory)

    def _verify_files(self, directory: Path, manifest: PolicyManifest) -> None:
        verify_policy_files(directory, manifest)

    def _finalise(self, base: dict, name: str, version: int, files: dict[str, str], previous: int | None,
                  beta: float) -> dict:
        final = base | {"format_version": base.get("format_version", POLICY_FORMAT_VERSION), "name": name,
                        "version": version, "files": files}
        PolicyManifest.model_validate(final)
        return final

    def _protected(self, name: str, current: int | None) -> set[int]:
        return set()

    def publish_adapter(self, name: str, write, manifest: PolicyManifest | dict) -> int:
        """Publish the next version of `name` (CURRENT follows); `write(tmpdir)` -> {file: sha256}."""
        return self.publish(name, write, manifest, extend_chain=False)


def write_adapter_files(model, directory: Path, base_model_name: str = "") -> dict[str, str]:
    """Write a peft model's LoRA weights (safetensors) and its adapter config into `directory`,
    in the layout peft's `save_pretrained` and vLLM's LoRA loader use; return {file: sha256}."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["base_model_name_or_path"] = base_model_name
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    return {f: sha256_file(directory / f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "METHODS", "POLICY_FORMAT_VERSION", "PolicyManifest", "PolicyRegistry",
           "check_adapter", "check_base", "default_policies_dir", "read_policy_manifest", "verify_policy_files",
           "write_adapter_files"]
