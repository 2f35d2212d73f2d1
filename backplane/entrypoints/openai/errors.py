"""OpenAI-style error bodies and the exception handlers that produce them.

Every error the server returns has the shape OpenAI clients parse::

    {"error": {"message": "...", "type": "...", "param": "...", "code": ...}}

FastAPI's own 422 validation errors (malformed JSON, wrong field types,
missing fields) are mapped to 400, which is what OpenAI returns for them.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backplane.core.engine.async_engine import (
    EngineDeadError,
    EngineStepError,
    RequestAbortedError,
)

# What a request's stream may raise when the engine, not the request, is at fault.
ENGINE_ERRORS = (EngineDeadError, RequestAbortedError, EngineStepError)

logger = logging.getLogger(__name__)


class OpenAIServingError(Exception):
    """An error to report to the client with an HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status: int = HTTPStatus.BAD_REQUEST,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.err_type = err_type
        self.param = param
        self.code = code

    def body(self) -> dict:
        """The JSON error body."""
        return error_body(self.message, self.err_type, self.param, self.code)


def error_body(message: str, err_type: str, param: str | None = None, code=None) -> dict:
    """``{"error": {...}}`` in OpenAI's format."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> OpenAIServingError:
    """A 400 invalid_request_error."""
    return OpenAIServingError(message, HTTPStatus.BAD_REQUEST, param=param)


# One-word request fields that may start an error message (field names with an
# underscore are recognised by their shape).
_PLAIN_FIELDS = frozenset(
    {"prompt", "messages", "n", "seed", "stop", "input", "model", "logprobs"}
)


def from_value_error(exc: ValueError) -> OpenAIServingError:
    """A 400 for a ValueError from SamplingParams or the engine.

    Their messages start with the field name (``"max_tokens must be >= 1, got -1"``,
    ``"stop_token_ids contains token id ..."``), which becomes the error's ``param``.
    """
    message = str(exc)
    first = message.split(" ", 1)[0].split("[", 1)[0].split(".", 1)[0]
    named = first.isidentifier() and first.islower() and (
        " must " in message or "_" in first or first in _PLAIN_FIELDS
    )
    return bad_request(message, first if named else None)


def engine_dead(exc: BaseException) -> OpenAIServingError:
    """A 503 for a request that met a dead or stopped engine."""
    return OpenAIServingError(
        str(exc), HTTPStatus.SERVICE_UNAVAILABLE, err_type="server_error", code="engine_unavailable"
    )


def engine_error(exc: BaseException) -> OpenAIServingError:
    """The client-facing error for one of ENGINE_ERRORS.

    A failed engine step is a 500 (the engine serves on); a dead or stopping
    engine, or a request aborted by the server, is a 503 (retry elsewhere or later).
    """
    if isinstance(exc, EngineStepError):
        return OpenAIServingError(
            f"internal server error: {exc}; the request was aborted",
            HTTPStatus.INTERNAL_SERVER_ERROR,
            err_type="server_error",
            code="engine_step_failed",
        )
    return engine_dead(exc)


def error_response(err: OpenAIServingError) -> JSONResponse:
    """The JSONResponse carrying ``err``."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == HTTPStatus.UNAUTHORIZED else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence (and the offending field) from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    parts = []
    first_param = None
    for err in errors[:5]:
        kind = err.get("type", "")
        refused = (err.get("ctx") or {}).get("error")
        if getattr(refused, "param", None):  # protocol.FieldError: already a full sentence
            return str(refused), refused.param
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            return f"request body is not valid JSON: {ctx.get('error', err.get('msg'))}", None
        # loc is ("body", field, ...); drop the "body" prefix and union-member names
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) if loc else "body"
        if first_param is None and loc:
            first_param = loc[0]
        if kind == "missing":
            parts.append(f"{field}: field required")
        else:
            value = err.get("input")
            shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
            parts.append(f"{field}: {err.get('msg')} (got {shown})")
    return "invalid request: " + "; ".join(parts), first_param


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app can raise answer in OpenAI's error format."""

    @app.exception_handler(OpenAIServingError)
    async def _serving_error(_request: Request, exc: OpenAIServingError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        message, param = _describe_validation_error(exc)
        return error_response(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(
            OpenAIServingError(str(exc.detail), exc.status_code, err_type=err_type)
        )

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_request: Request, exc: EngineDeadError):
        return error_response(engine_dead(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        logger.exception("unhandled error while serving a request")
        return error_response(
            OpenAIServingError(
                f"internal server error: {type(exc).__name__}: {exc}",
                HTTPStatus.INTERNAL_SERVER_ERROR,
                err_type="server_error",
            )
        )
