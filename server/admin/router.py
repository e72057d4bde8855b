"""Value admin routes (admin key required): list, load, rollback, unload."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Request

from common.admin_protocol import DeletedValue, LoadValueRequest, ValueList, ValueStatus
from server.auth import require_admin_key
from server.errors import InvalidRequestError, UnavailableError, error_responses
from server.value_manager import ValueManager
from valuefn.registry import RegistryError, validate_name

router = APIRouter(prefix="/v1/values", dependencies=[Depends(require_admin_key)], tags=["values"],
                   responses=error_responses(400, 401, 403, 404, 413, 503))


def get_manager(request: Request) -> ValueManager:
    manager = getattr(request.app.state, "values", None)
    if manager is None:
        raise UnavailableError("the server is starting; retry shortly", code="engine_starting")
    return manager


def checked(name: str) -> str:
    try:
        return validate_name(name)
    except RegistryError as exc:
        raise InvalidRequestError(str(exc), param="name", code="invalid_name") from exc


@router.get("", response_model=ValueList)
async def list_values(request: Request):
    return get_manager(request).list()


@router.get("/{name}", response_model=ValueStatus)
async def get_value(name: str, request: Request):
    return get_manager(request).status(checked(name))


@router.post("/{name}/load", response_model=ValueStatus)
async def load_value(name: str, request: Request, body: LoadValueRequest | None = Body(None)):
    version = body.version if body else None
    return await get_manager(request).load(checked(name), version, pin=version is not None)


@router.post("/{name}/rollback", response_model=ValueStatus)
async def rollback_value(name: str, request: Request):
    return await get_manager(request).rollback(checked(name))


@router.delete("/{name}", response_model=DeletedValue)
async def unload_value(name: str, request: Request):
    get_manager(request).unload(checked(name))
    return DeletedValue(name=name)
