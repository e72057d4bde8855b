"""Process settings of the server, read from flags and `IRO_*` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def iro_home() -> Path:
    """Cache folder for prepared models and the default value registry (`$IRO_HOME`)."""
    import os

    return Path(os.environ.get("IRO_HOME", Path.home() / ".cache" / "iro")).expanduser()


class ServerSettings(BaseSettings):
    """Everything `iro serve` needs. Each field can be set as `IRO_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="IRO_", extra="ignore")

    model: str | None = None
    """Path of a local Hugging Face model folder; None means the embedded default model."""
    served_model_name: str | None = None
    """Id shown in /v1/models; defaults to the model folder's name."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None
    """Bearer token required on /v1 routes when set."""
    admin_key: SecretStr | None = None
    """Bearer token required on value admin routes; falls back to api_key when unset."""
    values_dir: Path | None = None
    """Value registry to load and watch; default `$IRO_HOME/values`."""
    max_model_len: int = Field(2048, ge=64)
    max_n: int = Field(16, ge=1)
    """Largest `n` a request may ask for."""
    max_guided_candidates: int = Field(64, ge=1)
    """Cap on w*k for guided requests."""
    max_body_bytes: int = Field(2_000_000, ge=1024)
    max_queue: int = Field(256, ge=1)
    """Requests admitted at once; past it new requests get 429."""
    kv_cache_gib: int = Field(2, ge=1)
    """vLLM KV cache size (VLLM_CPU_KVCACHE_SPACE on CPU)."""
    block_size: int = Field(16, ge=16, multiple_of=16)
    """vLLM KV block size. vLLM's prefix cache reuses full blocks only, so each chunk request of a
    search re-prefills the partial last block of its prefix: small blocks make that short
    (16 on CPU through server.engine_patches; CBS took 1.31x plain sampling at 16, 1.60x at 32)."""
    max_num_batched_tokens: int | None = Field(None, ge=64)
    """Tokens per engine step (vLLM's default when None)."""
    enforce_eager: bool = False
    """Skip torch.compile of the engine's model: start ~2x faster, ~10% less throughput (measured on
    CPU: plain sampling 1398 vs 1271 tok/s, guided 12.9 vs 14.6 s). The tests run eager."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "bfloat16"
    engine_threads: str | None = "all"
    """CPU cores for the engine worker ("all", a vLLM bind spec like "0-1", or None for vLLM's default)."""
    scorer_threads: int = Field(2, ge=1)
    """torch threads used by the value scorer."""
    watch_values: bool = True
    cors_origins: Annotated[list[str], NoDecode] = []
    """Origins allowed to call the API from a browser (CORS); none by default, so no CORS headers.
    `IRO_CORS_ORIGINS` takes a JSON list or a comma-separated list."""
    log_prompts: bool = False
    """Log prompts and answers (off by default: they may be private)."""
    policies_dir: Path | None = None
    """Policy registry (distilled LoRA adapters) to serve and watch. Unset: no adapters, and the
    engine is built without LoRA (on CPU, LoRA turns graph compilation off)."""
    max_lora_rank: int = Field(16, ge=1)
    """Largest LoRA rank a policy adapter may have (vLLM sizes its LoRA buffers by it)."""
    max_loras: int = Field(4, ge=1)
    """Adapters vLLM holds at once (a swap keeps the old version until its requests finish)."""

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_from_env(cls, value):
        if isinstance(value, str):
            value = value.strip()
            return json.loads(value) if value.startswith("[") else [o.strip() for o in value.split(",") if o.strip()]
        return value

    def resolved_values_dir(self) -> Path:
        return (self.values_dir or iro_home() / "values").expanduser()

    def lora_options(self) -> dict:
        """vLLM's LoRA arguments: none unless a policy registry is configured."""
        if self.policies_dir is None:
            return {}
        return {"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": self.max_loras}

    def engine_options(self) -> dict:
        """The engine's part of these settings (`server.engine.engine_kwargs` / `VllmEngine.start`)."""
        return self.model_dump(include={"max_model_len", "kv_cache_gib", "block_size", "enforce_eager", "dtype",
                                        "engine_threads", "max_num_batched_tokens"})
