"""Bearer-token check for `--api-key`, as a plain ASGI middleware.

A middleware (not a route dependency) so that the key is checked before the
body is parsed: a client without the key learns nothing about its request.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
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
            or scope.get("path") in self._open_paths
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
