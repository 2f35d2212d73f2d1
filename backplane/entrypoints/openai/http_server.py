"""The HTTP layer's own protections: request body limit, header timeout, bounded drain.

uvicorn and Starlette leave these to the application: a 300 MB JSON body is
read and parsed whole, a client that trickles its headers holds a connection
forever, and on shutdown open streams are cancelled mid-response. These
pieces bound each of them; `backplane serve` wires them in from its options.
"""

from __future__ import annotations

import logging
import threading

import uvicorn
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from backplane.entrypoints.openai.errors import OpenAIServingError, error_response

logger = logging.getLogger(__name__)


class BodySizeLimitMiddleware:
    """Answer 413 to a request whose body is larger than ``max_bytes``.

    A declared Content-Length over the limit is refused before anything is
    read; a chunked body is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> OpenAIServingError:
        shown = f"{size} bytes" if size is not None else "more bytes"
        return OpenAIServingError(
            f"request body too large: {shown}, the limit is {self.max_bytes} bytes "
            "(--max-request-body-bytes)",
            413,
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._too_large(int(declared)))(scope, receive, send)
            return
        received = 0
        state = {"refused": False, "started": False}

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not state["started"]:
                        state["started"] = True
                        await error_response(self._too_large(None))(scope, receive, send)
                    state["refused"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return  # the 413 has been sent; the app's own answer is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not send headers in time.

    uvicorn's keep-alive timeout only runs between requests; a new connection
    (or a kept-alive one that starts a request) could otherwise trickle its
    headers forever. Use `with_timeout` to get a class bound to a timeout.
    """

    header_timeout_s: float = 10.0

    @classmethod
    def with_timeout(cls, seconds: float) -> type[HeaderTimeoutH11Protocol]:
        """A subclass whose connections wait at most ``seconds`` for request headers."""
        return type(cls.__name__, (cls,), {"header_timeout_s": float(seconds)})

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._header_timer is None:
            self._arm_header_timer()
        scope_before = self.scope
        super().data_received(data)
        if self.scope is not scope_before:  # a whole request head arrived
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _disarm_header_timer(self) -> None:
        timer, self._header_timer = getattr(self, "_header_timer", None), None
        if timer is not None:
            timer.cancel()

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:
            logger.info("closing a connection that sent no complete request headers within "
                        "%.0f s", self.header_timeout_s)
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, plus a bounded drain of the engine's requests on shutdown.

    uvicorn alone waits for open connections and then cancels them, cutting
    streams off mid-response. Here, once the grace period after the signal has
    passed, every request still in the engine is failed: each stream then
    sends its error event and ``[DONE]`` and closes by itself.
    """

    def __init__(self, config: uvicorn.Config, engine, grace_s: float) -> None:
        super().__init__(config)
        self._engine = engine
        self._grace_s = grace_s
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drain_timer is None:
            logger.info(
                "shutting down: %d request(s) in flight get up to %.0f s to finish",
                self._engine.num_unfinished_requests, self._grace_s,
            )
            self._drain_timer = threading.Timer(self._grace_s, self._drain)
            self._drain_timer.daemon = True
            self._drain_timer.start()
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        self._engine.fail_all(
            f"the server is shutting down and the {self._grace_s:g} s grace period has passed"
        )

    def engine_died(self, exc: BaseException) -> None:
        """Death callback: stop serving, so that the process exits non-zero."""
        logger.error("engine loop died (%s: %s); shutting the server down",
                     type(exc).__name__, exc)
        self.should_exit = True
