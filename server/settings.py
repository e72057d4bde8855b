"""Process settings of the server, read from flags and `IRO_*` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from common.engine_args import EngineSettings
from common.paths import default_values_dir


class ServerSettings(EngineSettings):
    """Everything `iro serve` needs. Each field can be set as `IRO_<FIELD>` in the environment; the
    engine's fields (max_model_len, kv_cache_gib, block_size, ...) come from `EngineSettings`."""

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
    max_n: int = Field(16, ge=1)
    """Largest `n` a request may ask for."""
    max_guided_candidates: int = Field(64, ge=1)
    """Cap on w*k for guided requests."""
    max_body_bytes: int = Field(2_000_000, ge=1024)
    max_queue: int = Field(256, ge=1)
    """Requests admitted at once; past it new requests get 429."""
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
        return (self.values_dir or default_values_dir()).expanduser()

    def lora_options(self) -> dict:
        """vLLM's LoRA arguments: none unless a policy registry is configured."""
        if self.policies_dir is None:
            return {}
        return {"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": self.max_loras}
