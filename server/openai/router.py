"""Thin routes: fetch the serving object from app.state, call it, return JSON or SSE."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from common.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, ModelList, ScoreRequest,
    ScoreResponse,
)
from server.auth import api_key_name, require_api_key
from server.errors import IroError, UnavailableError, error_responses
from server.openai.serving import OpenAIServing

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=error_responses(401, 503))



def generation_responses(chunk_model: str) -> dict:
    """What a generation route may answer besides its JSON body: SSE when `stream` is true, shaped errors.

    Each event's `data` is a chunk (`chunk_model`), an `ErrorResponse` if generation fails midway,
    or the final `[DONE]` (the schema describes one event, as OpenAPI 3.1 does for event streams).
    """
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk_model}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}
    return {200: {"description": "The JSON response; with `stream: true`, server-sent events instead: one "
                                 "`data: <chunk JSON>` line per chunk, then `data: [DONE]`.",
                  "content": {"text/event-stream": {"schema": event}}},
            **error_responses(400, 404, 413, 429)}


def get_serving(request: Request) -> OpenAIServing:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise UnavailableError("the engine is starting; retry shortly", code="engine_starting")
    serving.engine_check()
    return serving


async def until_disconnect(request: Request, coro):
    """Run `coro`, cancelling it (and so aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def guard_stream(stream: AsyncIterator[str], release) -> AsyncIterator[str]:
    """Turn errors raised mid-stream into an SSE error event; release the admission slot at the end."""
    try:
        async for item in stream:
            yield item
    except IroError as exc:
        yield f"data: {exc.to_response().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as exc:  # engine failure while streaming: tell the client, don't hang
        log.exception("stream failed")
        err = UnavailableError(f"generation failed: {type(exc).__name__}", code="engine_error")
        yield f"data: {err.to_response().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        release()


async def _respond(request: Request, serving: OpenAIServing, handler, body):
    serving.admit()
    streaming = False
    try:
        result = await until_disconnect(request, handler(body))
        if result is None:  # client gone; nobody reads this
            return JSONResponse({}, status_code=499)
        if isinstance(result, AsyncIterator) or hasattr(result, "__anext__"):
            streaming = True
            return StreamingResponse(guard_stream(result, serving.release), media_type="text/event-stream")
        return JSONResponse(result.model_dump(mode="json"))
    finally:
        if not streaming:
            serving.release()


@router.get("/models", response_model=ModelList)
async def list_models(request: Request):
    return get_serving(request).list_models()


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses=generation_responses("ChatCompletionStreamResponse"))
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    serving = get_serving(request)
    create = partial(serving.create_chat_completion, api_key_name=api_key_name(request))  # a stored answer's owner
    return await _respond(request, serving, create, body)


@router.post("/completions", response_model=CompletionResponse,
             responses=generation_responses("CompletionStreamResponse"))
async def create_completion(body: CompletionRequest, request: Request):
    serving = get_serving(request)
    return await _respond(request, serving, serving.create_completion, body)


@router.post("/score", response_model=ScoreResponse, responses=error_responses(400, 404, 413, 429))
async def score(body: ScoreRequest, request: Request):
    """Score responses to a prompt with a value chain (iro extension)."""
    serving = get_serving(request)
    scoring = getattr(request.app.state, "score_serving", None)
    if scoring is None:
        raise UnavailableError("value functions are not enabled", code="values_disabled")
    return await _respond(request, serving, scoring.score, body)
