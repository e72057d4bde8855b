"""`GET /v1/engine` (admin key): what the engine runs, as its workers reported it at start (the
`iro doctor` report of the running server)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from common.admin_protocol import EngineReport
from server.auth import require_admin_key
from server.errors import UnavailableError, error_responses

router = APIRouter(prefix="/v1/engine", dependencies=[Depends(require_admin_key)], tags=["engine"],
                   responses=error_responses(401, 403, 503))


@router.get("", response_model=EngineReport)
async def engine_report(request: Request):
    engine = getattr(request.app.state, "engine", None)
    if engine is None or getattr(engine, "settings", None) is None:
        raise UnavailableError("the server is starting; retry shortly", code="engine_starting")
    from server.doctor import collect

    return collect(engine.settings, engine.report)
