"""Policy admin routes (admin key required): list, load, rollback, delete a version.

Present on every server; they answer 404 `policies_disabled` unless it serves a policy registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from server.auth import require_admin_key
from server.errors import ConflictError, InvalidRequestError, NotFoundError, UnavailableError, error_responses
from valuefn.checkpoint import CheckpointError
from valuefn.registry import RegistryError, validate_name

router = APIRouter(prefix="/v1/policies", dependencies=[Depends(require_admin_key)], tags=["policies"],
                   responses=error_responses(400, 401, 403, 404, 409, 503))


def get_manager(request: Request):
    if getattr(request.app.state, "serving", None) is None:
        raise UnavailableError("the server is starting; retry shortly", code="engine_starting")
    manager = getattr(request.app.state, "policies", None)
    if manager is None:
        raise NotFoundError("this server serves no policy registry (start it with --policies-dir)",
                            code="policies_disabled")
    return manager


def checked(name: str) -> str:
    try:
        return validate_name(name, "policy")
    except RegistryError as exc:
        raise InvalidRequestError(str(exc), param="name", code="invalid_name") from exc


async def _guard(call):
    try:
        return await call
    except CheckpointError as exc:
        raise ConflictError(f"refused: {exc}", param="version", code=f"policy_refused:{exc.reason}") from exc
    except RegistryError as exc:
        raise NotFoundError(str(exc), param=exc.param or "name", code="policy_not_found") from exc


@router.get("")
async def list_policies(request: Request) -> dict[str, Any]:
    manager = get_manager(request)
    return {"object": "list", "registry": str(manager.registry.root), "data": manager.list()}


@router.get("/{name}")
async def get_policy(name: str, request: Request) -> dict[str, Any]:
    return get_manager(request).status(checked(name))


@router.post("/{name}/load")
async def load_policy(name: str, request: Request, body: dict | None = Body(None)) -> dict[str, Any]:
    version = (body or {}).get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise InvalidRequestError("version must be an integer >= 1", param="version", code="invalid_value")
    manager = get_manager(request)
    await _guard(manager.load(checked(name), version, pin=version is not None))
    return manager.status(name)


@router.post("/{name}/rollback")
async def rollback_policy(name: str, request: Request) -> dict[str, Any]:
    manager = get_manager(request)
    await _guard(manager.rollback(checked(name)))
    return manager.status(name)


@router.delete("/{name}/versions/{version}")
async def delete_policy_version(name: str, version: int, request: Request) -> dict[str, Any]:
    manager = get_manager(request)

    async def delete():
        manager.delete(checked(name), version)

    await _guard(delete())
    return {"name": name, "version": version, "deleted": True}
