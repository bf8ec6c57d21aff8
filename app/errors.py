"""Every error answers JSON `{"detail": ..., "field": ...}`: one readable line, never a traceback."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pivotmerge.errors import PivotMergeError
from pivotmerge.spec.schema import printable

from app.schemas import ErrorOut

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None):
        self.status, self.detail, self.field, self.headers = status, detail, field, headers


def error_response(status: int, detail: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorOut(detail=printable(detail), field=printable(field) if field is not None else None)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# A field path up to the first ": " (its keys may be any text a client sent, spaces excepted).
FIELD_PREFIX = re.compile(r"^([A-Za-z_\\][^:\s]*): ")


def field_named_in(message: str) -> str | None:
    """The engine's messages start with the field they blame: "models.0.model: not found"."""
    match = FIELD_PREFIX.match(message)
    return match.group(1) if match else None


def _field(loc: tuple[Any, ...]) -> str:
    # ("body", "models", 0, "model") -> "models.0.model"; ("query", "page_size") -> "page_size"
    parts = [str(p) for p in loc[1:] if not str(p).startswith("function-")] if len(loc) > 1 else [str(p) for p in loc]
    return ".".join(parts) or "body"


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    message = str(err["msg"]).removeprefix("Value error, ")
    field = _field(tuple(err["loc"])) if len(err["loc"]) > 1 else field_named_in(message) or "body"
    if err["type"] == "json_invalid":
        field, message = "body", "not valid JSON"
    return error_response(422, message if message.startswith(field) else f"{field}: {message}", field)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode, e.g. bytes that are not UTF-8
        return error_response(422, "body: not valid JSON", "body")
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.detail, exc.field, exc.headers)


def _engine_error(request: Request, exc: PivotMergeError) -> JSONResponse:
    return error_response(422, str(exc), field_named_in(str(exc)))


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error; the service log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(PivotMergeError, _engine_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or unknown API key."},
    422: {"model": ErrorOut, "description": "Invalid request; `field` names the culprit."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "No such job for this team."}}
