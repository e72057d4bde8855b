"""Thin routes of `/v1/files` and `/v1/batches` (same API keys as the other `/v1` routes; each
key sees only its own files and batches)."""

from __future__ import annotations

from typing import Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from server.auth import api_key_name, require_api_key
from server.batches.protocol import Batch, BatchCreateRequest, BatchList, FileDeleted, FileList, FileObject
from server.errors import InvalidRequestError, UnavailableError, error_responses

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=error_responses(401, 503))


def store_unavailable(request: Request) -> UnavailableError:
    reason = getattr(request.app.state, "store_error", None) or "the database is not open yet"
    return UnavailableError(f"the server's database is unavailable: {reason}", code="database_unavailable")


def get_files(request: Request):
    files = getattr(request.app.state, "files", None)
    if files is None:
        raise store_unavailable(request)
    return files


def get_batches(request: Request):
    batches = getattr(request.app.state, "batches", None)
    if batches is None:
        raise store_unavailable(request)
    return batches


# ----------------------------------------------------------------------------- files
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "additionalProperties": False,
    "properties": {"file": {"type": "string", "format": "binary", "description": "The JSONL batch input file."},
                   "purpose": {"type": "string", "enum": ["batch"]}}}}}}}
"""The multipart body the upload route reads itself (FastAPI would buffer a declared `UploadFile`
the same way; declared here so the document, and the fuzz, know it)."""


@router.post("/files", response_model=FileObject, responses=error_responses(400, 413, 429), openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request):
    """Upload a batch input file (multipart: `file` and `purpose`="batch")."""
    files = get_files(request)
    form = await request.form()
    try:
        unknown = sorted(set(form.keys()) - {"file", "purpose"})
        if unknown:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                                      code="unknown_field")
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("file is required (a multipart file part)", param="file", code="missing_field")
        if not isinstance(purpose, str):
            raise InvalidRequestError("purpose is required", param="purpose", code="missing_field")
        return await anyio.to_thread.run_sync(lambda: files.upload_sync(upload.file, upload.filename or "", purpose,
                                                                        api_key_name=api_key_name(request)))
    finally:
        await form.close()


@router.get("/files", response_model=FileList, responses=error_responses(400, 404))
async def list_files(request: Request, after: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                     order: Literal["asc", "desc"] = "desc", purpose: str | None = None):
    files = get_files(request)
    return await anyio.to_thread.run_sync(lambda: files.list_sync(after=after, limit=limit, order=order,
                                                                  purpose=purpose, api_key_name=api_key_name(request)))


@router.get("/files/{file_id}", response_model=FileObject, responses=error_responses(404))
async def retrieve_file(file_id: str, request: Request):
    files = get_files(request)
    return await anyio.to_thread.run_sync(lambda: files.get_sync(file_id, api_key_name=api_key_name(request)))


@router.get("/files/{file_id}/content", response_class=FileResponse, responses=error_responses(404))
async def file_content(file_id: str, request: Request):
    files = get_files(request)
    path = await anyio.to_thread.run_sync(lambda: files.content_path_sync(file_id, api_key_name=api_key_name(request)))
    return FileResponse(path, media_type="application/jsonl")


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=error_responses(404, 409))
async def delete_file(file_id: str, request: Request):
    files = get_files(request)
    return await anyio.to_thread.run_sync(lambda: files.delete_sync(file_id, api_key_name=api_key_name(request)))


# ----------------------------------------------------------------------------- batches
@router.post("/batches", response_model=Batch, responses=error_responses(400, 404, 429))
async def create_batch(body: BatchCreateRequest, request: Request):
    batches = get_batches(request)
    return await anyio.to_thread.run_sync(lambda: batches.create_sync(body, api_key_name=api_key_name(request)))


@router.get("/batches", response_model=BatchList, responses=error_responses(400, 404))
async def list_batches(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    batches = get_batches(request)
    return await anyio.to_thread.run_sync(lambda: batches.list_sync(after=after, limit=limit,
                                                                    api_key_name=api_key_name(request)))


@router.get("/batches/{batch_id}", response_model=Batch, responses=error_responses(404))
async def retrieve_batch(batch_id: str, request: Request):
    batches = get_batches(request)
    return await anyio.to_thread.run_sync(lambda: batches.get_sync(batch_id, api_key_name=api_key_name(request)))


@router.post("/batches/{batch_id}/cancel", response_model=Batch, responses=error_responses(404, 409))
async def cancel_batch(batch_id: str, request: Request):
    batches = get_batches(request)
    return await anyio.to_thread.run_sync(lambda: batches.cancel_sync(batch_id, api_key_name=api_key_name(request)))
