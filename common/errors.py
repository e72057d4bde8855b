"""The error body every endpoint answers with (OpenAI's shape): `{"error": {message, type, param, code}}`.

The exception types that map to it live with the server (`server.errors`); clients read this shape
(`clients.errors`)."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
