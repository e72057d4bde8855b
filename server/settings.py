"""Process settings of the server, read from flags and `IRO_*` environment variables.

`iro serve`'s flags are generated from these fields (`iro.settings_flags`): a field's docstring is
its flag's help, so every field has one."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from common import protocol
from common.engine_args import EngineSettings
from common.paths import default_values_dir, iro_home
from common.search_settings import REASONING_EFFORT_BUDGETS, ReasoningEffort


DEFAULT_KEY_NAME = "default"
"""The name of `api_key`, and of every caller when no key is set (files, batches, stored completions)."""
KeyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ServerSettings(EngineSettings):
    """Everything `iro serve` needs. Each field can be set as `IRO_<FIELD>` in the environment or as
    the flag `--<field>`; the engine's fields (max_model_len, kv_cache_gib, block_size, ...) come
    from `EngineSettings`."""

    model_config = SettingsConfigDict(env_prefix="IRO_", extra="ignore", use_attribute_docstrings=True)

    model: str | None = None
    """Path of a local Hugging Face model folder; None means the embedded default model."""
    served_model_name: str | None = None
    """Id shown in /v1/models; defaults to the model folder's name."""
    host: str = "127.0.0.1"
    """Bind address."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on."""
    api_key: SecretStr | None = None
    """Bearer token required on /v1 routes when set."""
    admin_key: SecretStr | None = None
    """Bearer token required on the admin routes (values, policies); falls back to api_key when unset."""
    api_keys: dict[KeyName, SecretStr] = {}
    """More API keys, by name (`{"alice": "sk-...", "bob": "sk-..."}`). Each name owns its files, batches
    and stored completions (another key gets 404 for them) and has its own quotas. `api_key` is the
    key named `default`, as is every caller when no key is set; a named key is never an admin key
    (with named keys and neither admin_key nor api_key, the admin routes answer 403)."""
    values_dir: Path | None = None
    """Value registry to load and watch; default `$IRO_HOME/values`. A folder, or
    `s3://bucket/prefix` (any S3-compatible store through the standard AWS settings)."""
    registry_poll_s: float = Field(1.0, gt=0, le=60)
    """How often a registry in object storage (values or policies at `s3://...`) is polled for a new
    CURRENT (a LIST and one HEAD per name); a folder registry is watched through file events instead."""
    max_n: int = Field(16, ge=1)
    """Largest `n` a request may ask for."""
    max_guided_candidates: int = Field(64, ge=1)
    """Cap on w*k for guided requests."""
    max_body_bytes: int = Field(2_000_000, ge=1024)
    """Largest request body; past it: 413."""
    max_queue: int = Field(256, ge=1)
    """Requests admitted at once; past it new requests get 429."""
    scorer_threads: int = Field(2, ge=1)
    """torch threads used by the value scorer."""
    watch_values: bool = True
    """Follow the value registry's CURRENT pointers: a newly published version is loaded and swapped in."""
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
    # --- the cost of one request, bounded before any work starts (over a limit: 400 naming the
    # field and the limit). List limits may only be lowered below the bounds the OpenAPI document
    # publishes (`common.protocol.MAX_*`).
    max_stop: int = Field(protocol.MAX_STOP, ge=0, le=protocol.MAX_STOP)
    """`stop` strings per request."""
    max_stop_token_ids: int = Field(protocol.MAX_STOP_TOKEN_IDS, ge=0, le=protocol.MAX_STOP_TOKEN_IDS)
    """`stop_token_ids` per request."""
    max_logit_bias: int = Field(protocol.MAX_LOGIT_BIAS, ge=0, le=protocol.MAX_LOGIT_BIAS)
    """`logit_bias` entries per request."""
    max_prompts: int = Field(protocol.MAX_PROMPTS, ge=1, le=protocol.MAX_PROMPTS)
    """Prompts in one completion request (counted before any is tokenized)."""
    max_guided_steps: int = Field(512, ge=1)
    """Search steps of a guided request: ceil(max_tokens / guidance.l) for cbs. Without max_tokens
    a request may run up to the context length; past this it must set max_tokens or a larger l."""
    pf_temperature: float = Field(0.1, gt=0, le=100)
    """Particle filtering (guidance.mode pf) resamples by softmax(chain score / pf_temperature) when a
    request sets no guidance.beta/betas. Values score in reward units (about -1..1), where a
    temperature of 1 barely tells particles apart; 0.1 measured best (bench/results/frontier)."""
    reasoning_effort_budgets: dict[ReasoningEffort, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: dict(REASONING_EFFORT_BUDGETS))
    """Token budget of a guided search for each OpenAI `reasoning_effort`, as a multiple of the request's
    max_tokens (none 1, minimal 2, low 4, medium 16, high 32, xhigh 64 by default; an effort left out
    keeps its default). `IRO_REASONING_EFFORT_BUDGETS` takes JSON, e.g. '{"high": 24}'."""
    max_score_responses: int = Field(protocol.MAX_SCORE_RESPONSES, ge=1, le=protocol.MAX_SCORE_RESPONSES)
    """Responses in one /v1/score request."""
    max_score_tokens: int = Field(16384, ge=1)
    """Tokens one /v1/score request sends through the value chain (prompt + response, summed)."""
    max_score_queue: int = Field(8, ge=1)
    """/v1/score requests scored or waiting for the scorer at once; past it: 429 with Retry-After."""
    # --- jobs and data: files, batches, stored completions ----------------------------------
    data_dir: Path | None = None
    """Folder of the database (SQLite) and of uploaded and batch output files; default `$IRO_HOME/data`."""
    database_url: SecretStr | None = None
    """SQLAlchemy URL of the database (files' metadata, batches, stored completions); default
    `sqlite:///<data_dir>/iro.db`. Several replicas share a PostgreSQL one (`postgresql+psycopg://...`)."""
    max_file_bytes: int = Field(200_000_000, ge=1024)
    """Largest file `POST /v1/files` accepts (OpenAI's batch input limit: 200 MB)."""
    max_files_per_key: int = Field(10_000, ge=1)
    """Files one API key may keep: its uploads and its batches' output and error files (a deleted
    file no longer counts). An upload past it: 429 naming the quota."""
    max_file_storage_bytes_per_key: int = Field(10_000_000_000, ge=1024)
    """Bytes of files one API key may keep (uploads, batch outputs and error files). An upload past
    it: 429 naming the quota."""
    max_active_batches_per_key: int = Field(100, ge=1)
    """Batches of one API key not yet ended (validating, in progress, finalizing, cancelling). A new
    batch past it: 429 naming the quota."""
    batch_concurrency: int = Field(4, ge=1)
    """Batch lines answered at once while no interactive request is in progress (one while any is)."""
    batch_yield_max_s: float = Field(2.0, ge=0)
    """Longest a batch line's guided search waits before each step while interactive requests run
    (or ran in the last second), so they do not share the engine's steps; bounds the slow-down of
    a batch under interactive traffic that never pauses (0: batch lines never wait)."""
    batch_max_preemptions: int = Field(8, ge=0)
    """How many times one engine request of a batch line may be cancelled when an interactive request
    arrives while it runs (it then waits, as a step does, and runs again from its start; a seeded
    request gives the same answer); past that, or when it started while interactive requests ran, it
    runs to its end (0: batch requests are never cancelled). 8, not 2: with 2, the requests that had
    used theirs up ran beside the next interactive request, and 14% of interactive requests took over
    twice the idle median during a mixed batch, against 3% (bench/results/batch-api/gaps/arms.md)."""
    store_everything: bool = False
    """Store every non-streamed chat completion (as with `store: true`) unless it says `store: false`;
    off by default (prompts may be private) and logged at start when on."""
    # --- connections (uvicorn) -------------------------------------------------------------
    limit_concurrency: int | None = Field(1024, ge=1)
    """Connections plus requests in progress at once before uvicorn answers 503 (None: no limit)."""
    timeout_keep_alive: int = Field(5, ge=1)
    """Seconds an idle keep-alive connection is kept open."""
    body_timeout: float = Field(60.0, gt=0)
    """Seconds a client has to send a whole request body once its headers arrived; past it: 408 and
    the connection is closed (a stalled upload no longer holds a connection forever)."""
    allow_open_admin: bool = Field(False, validate_default=True, json_schema_extra={"flag": "--allow-open-admin"})
    """Serve on a non-loopback address with neither an admin key nor an API key, so that anyone who
    can reach the port can load, unload and delete values and policies. Refused unless set."""
    replicas: int = Field(1, ge=1)
    """Copies of this server, each with its own engine, behind one port (Ray Serve's proxy; model
    multiplexing routes guided requests by value name). 1: this process alone, no Ray. More needs
    the `ray` extra; each replica takes the same settings (docs/scale-out.md)."""
    replica_max_ongoing_requests: int = Field(16, ge=1)
    """With replicas: requests one replica takes at once (Ray Serve's `max_ongoing_requests`); more
    wait in the proxy. A value's guided requests go to the replicas already serving it until those
    are full, then spread to the others: lower it to spread one hot value over more replicas."""

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_from_env(cls, value):
        if isinstance(value, str):
            value = value.strip()
            return json.loads(value) if value.startswith("[") else [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_distinct(cls, keys: dict[str, SecretStr], info: ValidationInfo) -> dict[str, SecretStr]:
        secrets = [k.get_secret_value() for k in keys.values()]
        if info.data.get("api_key") is not None:
            secrets.append(info.data["api_key"].get_secret_value())
        if len(set(secrets)) < len(secrets):
            raise ValueError("two API keys (api_key and api_keys) are the same; each key must be distinct, since "
                             "the key decides whose files, batches and stored completions a request sees")
        if any(not secret for secret in secrets):
            raise ValueError("an API key in api_keys is empty")
        return keys

    def named_api_keys(self) -> list[tuple[str, str]]:
        """(name, key) of every API key: api_key as `default`, then api_keys; empty when auth is off."""
        named = [(DEFAULT_KEY_NAME, self.api_key.get_secret_value())] if self.api_key is not None else []
        return named + [(name, key.get_secret_value()) for name, key in self.api_keys.items()]

    @field_validator("allow_open_admin")
    @classmethod
    def _admin_closed_off_loopback(cls, allow: bool, info: ValidationInfo) -> bool:
        data = info.data
        if (allow or is_loopback(data.get("host", "127.0.0.1")) or data.get("admin_key") or data.get("api_key")
                or data.get("api_keys")):  # named keys only: the admin routes answer 403
            return allow
        raise ValueError(f"refusing to serve the admin routes (/v1/values, /v1/policies) without a key on "
                         f"{data.get('host')!r}, a non-loopback address: set an admin key (IRO_ADMIN_KEY, "
                         "--admin-key) or an API key, bind 127.0.0.1, or pass --allow-open-admin "
                         "(IRO_ALLOW_OPEN_ADMIN=true) to accept it")

    def admin_open_to_network(self) -> bool:
        """True when the admin routes are reachable without a key from other machines."""
        return not is_loopback(self.host) and self.admin_key is None and self.api_key is None and not self.api_keys

    def uvicorn_options(self) -> dict:
        """uvicorn's settings: address, connection limit, keep-alive."""
        return {"host": self.host, "port": self.port, "limit_concurrency": self.limit_concurrency,
                "timeout_keep_alive": self.timeout_keep_alive}

    def resolved_values_dir(self) -> Path:
        return (self.values_dir or default_values_dir()).expanduser()

    def resolved_data_dir(self) -> Path:
        return (self.data_dir or iro_home() / "data").expanduser()

    def lora_options(self) -> dict:
        """vLLM's LoRA arguments: none unless a policy registry is configured."""
        if self.policies_dir is None:
            return {}
        return {"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": self.max_loras}


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to any interface
        return False
