"""Bearer-token check for `--api-key`, as a plain ASGI middleware.

A middleware (not a route dependency) so that the key is checked before the
body is parsed: a client without the key learns nothing about its request.
"""

from __future__ import annotations

import hmac
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Receive, Scope, Send

from backplane.entrypoints.openai.errors import OpenAIServingError, error_response

# Paths that stay reachable without the key: liveness probes and scrapers.
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})


class APIKeyMiddleware:
    """Answer 401 unless ``Authorization: Bearer <key>`` matches (constant-time compare)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths=OPEN_PATHS) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")
        self._open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") == "OPTIONS"
            or route_path(scope) in self._open_paths
        ):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8"), self._key
        ):
            message = (
                "missing API key: send 'Authorization: Bearer <key>'"
                if not header
                else "invalid API key"
            )
            response = error_response(
                OpenAIServingError(message, 401, param=None, code="invalid_api_key")
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The request path without the ASGI root_path (``--root-path /api``).

    uvicorn puts the root path in front of ``path``, so ``/api/health`` must be
    compared as ``/health``.
    """
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


class RequestIdHeaderMiddleware:
    """``--enable-request-id-headers``: answer with ``X-Request-Id``.

    The client's own ``X-Request-Id`` is echoed; without one a new id is made.
    The handlers also show the client's id as the response id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
