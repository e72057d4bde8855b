"""Wire schemas of the value admin API (`/v1/values`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from common.protocol import OpenAIBaseModel


class RefusedVersion(OpenAIBaseModel):
    version: int
    reason: str
    at: float = Field(description="Unix time of the refusal.")


class ValueStatus(OpenAIBaseModel):
    """One value function as the server sees it."""

    name: str
    model: str = Field(description="Aligned model id usable as `model`: `<base>+<name>`.")
    serving_version: int | None = Field(None, description="Version answering requests (None: not loaded).")
    chain: list[int] = Field(default_factory=list, description="Versions V_1..V_t scored by the serving chain.")
    betas: list[float] = Field(default_factory=list)
    defaults: dict = Field(default_factory=dict, description="Default search settings (mode, w, k, l).")
    versions_on_disk: list[int] = Field(default_factory=list)
    current_on_disk: int | None = Field(None, description="Version named by the registry's CURRENT file.")
    refused: list[RefusedVersion] = Field(default_factory=list)
    loaded_at: float | None = None
    pinned: bool = Field(False, description="True when an admin call chose the version (the watcher then waits "
                                            "for a newer CURRENT before switching).")


class ValueList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ValueStatus]
    registry_error: str | None = Field(None, description="Why the registry could not be read, if it could not.")


class LoadValueRequest(OpenAIBaseModel):
    version: int | None = Field(None, ge=1, description="Version to load (default: the registry's CURRENT).")


class DeletedValue(OpenAIBaseModel):
    name: str
    deleted: bool = True


class EngineReport(OpenAIBaseModel):
    """`GET /v1/engine`: what the server's engine runs (the `iro doctor` report, with the patches
    and value kinds as the engine's workers reported them at start)."""

    versions: dict[str, str]
    platform: dict[str, Any]
    dtype: dict[str, str]
    model_runner: dict[str, str]
    parallel: dict[str, int]
    patches: dict[str, str] = Field(description="Each engine patch: \"installed\" or why not (and the report's source).")
    values: dict[str, str] = Field(description="Where each kind of value is computed: the engine or the scorer.")
    memory: dict[str, Any]
