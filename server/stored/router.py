"""Thin routes of stored chat completions (`GET/POST/DELETE /v1/chat/completions[/{id}]`); each API
key sees only its own."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request

from server.auth import api_key_name, require_api_key
from server.batches.router import store_unavailable
from server.errors import InvalidRequestError, error_responses
from server.stored.protocol import (
    StoredCompletion, StoredCompletionDeleted, StoredCompletionList, StoredCompletionsDeleted,
    StoredCompletionUpdate, StoredMessageList,
)
from server.stored.serving import MAX_LIMIT

router = APIRouter(prefix="/v1/chat/completions", dependencies=[Depends(require_api_key)],
                   responses=error_responses(401, 503))


def get_stored(request: Request):
    stored = getattr(request.app.state, "stored", None)
    if stored is None:
        raise store_unavailable(request)
    return stored


def list_query(request: Request, allowed: set[str]) -> dict:
    """after, limit, order, model and `metadata[key]=value` pairs from the query string; any other
    parameter is refused (400 naming it)."""
    out: dict = {"metadata": {}}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]") and "metadata" in allowed:
            out["metadata"][key[len("metadata["):-1]] = value
        elif key in allowed and key != "metadata":
            out[key] = value
        else:
            raise InvalidRequestError(f"Unrecognized query parameter: {key}", param=key, code="unknown_field")
    if "limit" in out:
        if not out["limit"].isdigit() or not 1 <= int(out["limit"]) <= MAX_LIMIT:
            raise InvalidRequestError(f"limit must be an integer in [1, {MAX_LIMIT}]", param="limit",
                                      code="invalid_value")
        out["limit"] = int(out["limit"])
    if out.get("order", "asc") not in ("asc", "desc"):
        raise InvalidRequestError("order must be asc or desc", param="order", code="invalid_value")
    if "metadata" not in allowed:
        out.pop("metadata")
    return out


def query_parameters(*names: str) -> dict:
    """`openapi_extra` declaring the query parameters `list_query` reads (the document and the fuzz
    know them; `metadata` is OpenAI's `metadata[key]=value`, a deepObject)."""
    schemas = {"after": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
               "order": {"type": "string", "enum": ["asc", "desc"]}, "model": {"type": "string"},
               "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}
    return {"parameters": [{"name": n, "in": "query", "required": False, "schema": schemas[n],
                            **({"style": "deepObject", "explode": True} if n == "metadata" else {})} for n in names]}


@router.get("", response_model=StoredCompletionList, responses=error_responses(400, 404),
            openapi_extra=query_parameters("after", "limit", "order", "model", "metadata"))
async def list_stored(request: Request):
    """Stored completions; `metadata[key]=value` (repeatable) and `model` filter, `after` + `limit`
    paginate, `order` asc (default) or desc."""
    stored = get_stored(request)
    query = list_query(request, {"after", "limit", "order", "model", "metadata"})
    return await anyio.to_thread.run_sync(lambda: stored.list_sync(**query, api_key_name=api_key_name(request)))


@router.delete("", response_model=StoredCompletionsDeleted, responses=error_responses(400),
               openapi_extra=query_parameters("model", "metadata"))
async def delete_stored_matching(request: Request):
    """Delete every stored completion matching `metadata[key]=value` and/or `model` (iro extension)."""
    stored = get_stored(request)
    query = list_query(request, {"model", "metadata"})
    return await anyio.to_thread.run_sync(lambda: stored.delete_matching_sync(
        model=query.get("model"), metadata=query["metadata"], api_key_name=api_key_name(request)))


@router.get("/{completion_id}", response_model=StoredCompletion, responses=error_responses(404))
async def retrieve_stored(completion_id: str, request: Request):
    stored = get_stored(request)
    return await anyio.to_thread.run_sync(lambda: stored.get_sync(completion_id, api_key_name=api_key_name(request)))


@router.post("/{completion_id}", response_model=StoredCompletion, responses=error_responses(400, 404))
async def update_stored(completion_id: str, body: StoredCompletionUpdate, request: Request):
    stored = get_stored(request)
    return await anyio.to_thread.run_sync(lambda: stored.update_sync(completion_id, body.metadata,
                                                                     api_key_name=api_key_name(request)))


@router.delete("/{completion_id}", response_model=StoredCompletionDeleted, responses=error_responses(404))
async def delete_stored(completion_id: str, request: Request):
    stored = get_stored(request)
    return await anyio.to_thread.run_sync(lambda: stored.delete_sync(completion_id,
                                                                     api_key_name=api_key_name(request)))


@router.get("/{completion_id}/messages", response_model=StoredMessageList, responses=error_responses(400, 404),
            openapi_extra=query_parameters("after", "limit", "order"))
async def stored_messages(completion_id: str, request: Request):
    stored = get_stored(request)
    query = list_query(request, {"after", "limit", "order"})
    return await anyio.to_thread.run_sync(lambda: stored.messages_sync(completion_id, **query,
                                                                       api_key_name=api_key_name(request)))
