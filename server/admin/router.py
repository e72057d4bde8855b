"""Admin routes of the watched registries (admin key required), one shape for values and policies:
list, status, load (a version pins it; none follows CURRENT), rollback, unload (DELETE).

`registry_router` builds them for one kind; this module's `router` serves `/v1/values`
(`server.admin.policies_router` serves `/v1/policies`). The schemas are `common.admin_protocol`'s."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Body, Depends, Request

from common.admin_protocol import LoadRequest, RegistryEntryStatus, RegistryList, Unloaded, ValueList, ValueStatus
from server.auth import require_admin_key
from server.errors import InvalidRequestError, UnavailableError, error_responses
from server.registry_manager import RegistryManager
from valuefn.registry import RegistryError, validate_name


def checked(name: str, kind: str) -> str:
    try:
        return validate_name(name, kind)
    except RegistryError as exc:
        raise InvalidRequestError(str(exc), param="name", code="invalid_name") from exc


def registry_router(prefix: str, kind: str, manager_of: Callable[[Request], RegistryManager],
                    status: type[RegistryEntryStatus], listing: type[RegistryList]) -> APIRouter:
    """The admin routes of one watched registry under `prefix` (e.g. "/v1/values")."""
    plural = prefix.rsplit("/", 1)[-1]
    router = APIRouter(prefix=prefix, dependencies=[Depends(require_admin_key)], tags=[plural],
                       responses=error_responses(400, 401, 403, 404, 409, 413, 503))

    @router.get("", response_model=listing, name=f"list_{plural}")
    async def list_entries(request: Request):
        entries = manager_of(request).list()
        replicas = getattr(request.app.state, "replica_board", None)  # behind Ray Serve (server.ray_serve)
        if replicas is not None and "replicas" in type(entries).model_fields:
            entries.replicas = await replicas()
        return entries

    @router.get("/{name}", response_model=status, name=f"get_{kind}")
    async def get_entry(name: str, request: Request):
        return manager_of(request).status(checked(name, kind))

    @router.post("/{name}/load", response_model=status, name=f"load_{kind}")
    async def load_entry(name: str, request: Request, body: LoadRequest | None = Body(None)):
        manager, name = manager_of(request), checked(name, kind)
        version = body.version if body else None
        await manager.load(name, version, pin=version is not None)
        return manager.status(name)

    @router.post("/{name}/rollback", response_model=status, name=f"rollback_{kind}")
    async def rollback_entry(name: str, request: Request):
        manager, name = manager_of(request), checked(name, kind)
        await manager.rollback(name)
        return manager.status(name)

    @router.delete("/{name}", response_model=Unloaded, name=f"unload_{kind}")
    async def unload_entry(name: str, request: Request):
        name = checked(name, kind)
        await manager_of(request).unload(name)
        return Unloaded(name=name)

    return router


def values_manager(request: Request) -> RegistryManager:
    manager = getattr(request.app.state, "values", None)
    if manager is None:
        raise UnavailableError("the server is starting; retry shortly", code="engine_starting")
    return manager


router = registry_router("/v1/values", "value", values_manager, ValueStatus, ValueList)
