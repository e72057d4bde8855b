"""Wire schemas of `/v1/files` and `/v1/batches` (the shapes of the openai SDK's `FileObject`,
`FileDeleted`, `Batch` and cursor pages), and the batch input line."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from common.protocol import OpenAIBaseModel, OpenAIRequestModel, check_metadata

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_BATCH_LINES = 50_000
"""Requests in one batch input file (OpenAI's limit)."""
Metadata = dict[str, str]


# ----------------------------------------------------------------------------- files
class FileObject(OpenAIBaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(OpenAIBaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchInputLine(OpenAIRequestModel):
    """One line of a batch input file."""

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


# ----------------------------------------------------------------------------- batches
class BatchCreateRequest(OpenAIRequestModel):
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: Metadata | None = Field(None, description="Up to 16 string pairs (keys <= 64, values <= 512 chars).")
    output_expires_after: dict[str, Any] | None = Field(None, description="Refused: outputs do not expire here.")

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value):
        return check_metadata(value)

    @field_validator("output_expires_after")
    @classmethod
    def _no_expiry(cls, value):
        if value is not None:  # refused, not ignored
            raise ValueError("output_expires_after is not supported: outputs are kept until deleted")
        return value


class BatchRequestCounts(OpenAIBaseModel):
    completed: int = 0
    failed: int = 0
    total: int = 0


class BatchError(OpenAIBaseModel):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = []


class BatchUsage(OpenAIBaseModel):
    input_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int = 0
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int = 0


BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]


class Batch(OpenAIBaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    usage: BatchUsage | None = None
    metadata: Metadata | None = None


class BatchList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
