"""Wire schemas of stored chat completions (the openai SDK's `client.chat.completions.list /
retrieve / update / delete / messages.list` shapes) and the record training reads."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from common.protocol import ChatCompletionResponse, OpenAIBaseModel, OpenAIRequestModel, check_metadata


class StoredCompletion(ChatCompletionResponse):
    """A stored `chat.completion` with its `metadata`; `prompt_token_ids`, each choice's
    `token_ids`, `request` and `policy` are filled in (iro extension: what training reads)."""

    metadata: dict[str, str] = Field(default_factory=dict)
    # --- iro extension -------------------------------------------------------------------
    request: dict[str, Any] | None = Field(None, description="The request as sent (messages and settings).")
    prompt_text: str | None = Field(None, description="The prompt as the model saw it (chat template applied).")
    policy: dict[str, Any] | None = Field(None, description="What answered: base, value, versions, betas, search "
                                          "settings, adapter.")


class StoredCompletionList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[StoredCompletion]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class StoredCompletionDeleted(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    deleted: bool = True


class StoredCompletionsDeleted(OpenAIBaseModel):
    """`DELETE /v1/chat/completions?metadata[k]=v` (iro extension): how many were deleted."""

    object: Literal["chat.completion.deleted.list"] = "chat.completion.deleted.list"
    deleted: int


class StoredCompletionUpdate(OpenAIRequestModel):
    metadata: dict[str, str] | None = Field(description="Replaces the completion's metadata (null clears it).")

    @field_validator("metadata")
    @classmethod
    def _limits(cls, value):
        return check_metadata(value)


class StoredMessage(OpenAIBaseModel):
    id: str
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    content_parts: list[dict[str, Any]] | None = None


class StoredMessageList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[StoredMessage]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class StoredRecord(OpenAIBaseModel):
    """Everything kept of one completion (what `iro data export` reads)."""

    id: str
    created: int
    model: str
    metadata: dict[str, str]
    request: dict[str, Any]
    response: dict[str, Any]
    prompt_text: str | None = None
    prompt_token_ids: list[int]
    completion_token_ids: list[list[int]] = Field(description="One list per choice.")
    policy: dict[str, Any] = Field(description="base, value, versions, betas, search settings, adapter.")
