"""Wire schemas of the admin API: the watched registries (`/v1/values`, `/v1/policies`) and `/v1/engine`.

Values and policies share one route shape and one status schema:

    GET    /v1/{values,policies}                 -> ValueList | PolicyList
    GET    /v1/{values,policies}/{name}          -> ValueStatus | PolicyStatus
    POST   /v1/{values,policies}/{name}/load     LoadRequest -> the status (a version pins; none follows CURRENT)
    POST   /v1/{values,policies}/{name}/rollback -> the status (the newest earlier version that loads)
    DELETE /v1/{values,policies}/{name}          -> Unloaded (stops serving it; its files stay)
    DELETE /v1/policies/{name}/versions/{N}      -> DeletedVersion (removes a policy version from disk)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from common.protocol import OpenAIBaseModel, OpenAIRequestModel


class RefusedVersion(OpenAIBaseModel):
    version: int
    reason: str = Field(description="Why, starting with its tag (e.g. `hash_mismatch: ...`); never the server's paths.")
    at: float = Field(description="Unix time of the refusal.")


class RegistryEntryStatus(OpenAIBaseModel):
    """One entry of a watched registry (a value or a policy) as the server sees it."""

    name: str
    model: str = Field(description="Model id usable as `model`: `<base>+<name>` for a value, `<name>` for a policy.")
    serving_version: int | None = Field(None, description="Version answering requests (None: not loaded).")
    versions_on_disk: list[int] = Field(default_factory=list)
    current_on_disk: int | None = Field(None, description="Version named by the registry's CURRENT file.")
    refused: list[RefusedVersion] = Field(default_factory=list)
    loaded_at: float | None = None
    pinned: bool = Field(False, description="True when an admin call chose the version (the watcher then waits "
                                            "for a newer CURRENT before switching).")


class ValueStatus(RegistryEntryStatus):
    """One value function as the server sees it."""

    chain: list[int] = Field(default_factory=list, description="Versions V_1..V_t scored by the serving chain.")
    betas: list[float] = Field(default_factory=list)
    defaults: dict = Field(default_factory=dict, description="Default search settings (mode, w, k, l).")


class PolicyStatus(RegistryEntryStatus):
    """One distilled policy adapter as the server sees it."""

    root: str = Field(description="The base model the adapter applies to.")
    method: str | None = Field(None, description="Distillation method of the serving version (apa, is-dpo, is-ipo).")
    served_version: int | None = Field(None, description="Deprecated: the same as `serving_version` (kept until "
                                                         "the trainer's loop waits through the client).")


class ReplicaServing(OpenAIBaseModel):
    """What one replica serves behind Ray Serve (`iro serve --replicas N`), as it last reported it."""

    replica: str = Field(description="Ray Serve's id of the replica.")
    values: dict[str, int] = Field(description="Each loaded value's serving version.")
    registry_error: str | None = Field(None, description="Why this replica could not read the registry, if it could not.")
    reported_at: float = Field(description="Unix time of the report (each replica reports every second).")


class RegistryList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    registry: str | None = Field(None, description="The registry this server watches.")
    registry_error: str | None = Field(None, description="Why the registry could not be read, if it could not.")


class ValueList(RegistryList):
    data: list[ValueStatus]
    replicas: list[ReplicaServing] | None = Field(None, description="Behind Ray Serve: what every live replica "
                                                                    "serves (None from a single server).")


class PolicyList(RegistryList):
    data: list[PolicyStatus]


class LoadRequest(OpenAIRequestModel):
    """Body of `POST .../{name}/load` (optional)."""

    version: int | None = Field(None, ge=1, strict=True, description="Version to load and pin (default: the "
                                                                     "registry's CURRENT, and any pin is lifted).")


class Unloaded(OpenAIBaseModel):
    """Answer of `DELETE /v1/{values,policies}/{name}`: no longer served (its files stay)."""

    name: str
    deleted: bool = True


class DeletedVersion(OpenAIBaseModel):
    """Answer of `DELETE /v1/policies/{name}/versions/{N}`: that version is gone from the registry."""

    name: str
    version: int
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
