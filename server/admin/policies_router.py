"""Policy admin routes (admin key required): the routes every watched registry has
(`server.admin.router.registry_router`: list, status, load, rollback, unload), plus the deletion
of one version from disk (`DELETE /v1/policies/{name}/versions/{N}`).

Present on every server; they answer 404 `policies_disabled` unless it serves a policy registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Path, Request

from common.admin_protocol import DeletedVersion, PolicyList, PolicyStatus
from server.admin.router import checked, registry_router
from server.errors import NotFoundError, UnavailableError

if TYPE_CHECKING:
    from server.policies import PolicyManager


def policies_manager(request: Request) -> PolicyManager:
    if getattr(request.app.state, "serving", None) is None:
        raise UnavailableError("the server is starting; retry shortly", code="engine_starting")
    manager = getattr(request.app.state, "policies", None)
    if manager is None:
        raise NotFoundError("this server serves no policy registry (start it with --policies-dir)",
                            code="policies_disabled")
    return manager


router = registry_router("/v1/policies", "policy", policies_manager, PolicyStatus, PolicyList)


@router.delete("/{name}/versions/{version}", response_model=DeletedVersion, name="delete_policy_version")
async def delete_policy_version(name: str, request: Request, version: int = Path(ge=1)):
    """Remove one version from the registry's disk (409 for the serving version and CURRENT)."""
    name = checked(name, "policy")
    await policies_manager(request).delete_version(name, version)
    return DeletedVersion(name=name, version=version)
