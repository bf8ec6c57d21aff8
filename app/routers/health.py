"""Liveness and readiness probes; no API key needed."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.schemas import HealthOut

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_SECONDS = 3


@router.get("/healthz", operation_id="healthz", summary="The process is up")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", operation_id="readyz", summary="The database and the broker are reachable",
            responses={503: {"model": HealthOut, "description": "A dependency is unreachable."}})
def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready"
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with request.app.state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
        checks["broker"] = "ok"
    except Exception as exc:  # kombu raises transport-specific errors
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    body = HealthOut(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
