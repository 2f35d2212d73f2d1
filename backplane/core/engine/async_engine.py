"""AsyncEngine: drives an LLMEngine from a background thread for asyncio callers.

`LLMEngine.step()` is blocking CPU/device work, so it must not run on the
server's event loop. One dedicated thread owns the LLMEngine; nothing else
touches it. Callers talk to that thread through a thread-safe command queue
(add, abort, stop, reset_prefix_cache), and each request gets an asyncio
queue that the thread fills with `loop.call_soon_threadsafe`. The thread
steps while any request is unfinished and sleeps on an Event otherwise, so new
requests join the running batch at the next step (continuous batching).

Failure model: bad input never reaches a step: it is refused by `add_request`
and fails that request alone. If `step()` raises anyway (a bug, a device
error), every request in flight fails with `EngineStepError`, their KV blocks
are freed, and the loop goes on serving new requests. Only when steps keep
failing (`MAX_CONSECUTIVE_STEP_FAILURES` in a row) or the recovery itself
fails is the engine declared dead: the thread fails every pending request with
`EngineDeadError`, runs the death callbacks (the server uses one to exit with a
non-zero status so that a supervisor restarts it) and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backplane.outputs import RequestOutput
from backplane.sampling_params import SamplingParams

if TYPE_CHECKING:
    from backplane.config import EngineArgs

logger = logging.getLogger(__name__)

# While idle the loop thread wakes this often anyway, to notice a stop request
# even if an Event.set() were somehow lost.
_IDLE_WAKE_S = 1.0
# A failed step fails the requests in flight and the loop carries on; this many
# failures in a row mean the engine itself is broken, and it is declared dead.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineDeadError(RuntimeError):
    """The engine loop is not running (it crashed or was shut down)."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the engine (shutdown) before it finished."""


class EngineStepError(RuntimeError):
    """An engine step failed while this request was in flight; the engine goes on serving."""


@dataclass
class _AddCommand:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    arrival_time: float | None
    stream: RequestStream
    accepted: concurrent.futures.Future
    lora_request: object | None = None


@dataclass
class _AbortCommand:
    request_ids: list[str]


@dataclass
class _StopCommand:
    pass


@dataclass
class _FailAllCommand:
    reason: str


@dataclass
class _CallCommand:
    """Run ``fn(llm_engine)`` in the loop thread, between steps; its result goes to ``done``."""

    fn: Callable[[Any], Any]
    done: concurrent.futures.Future


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative RequestOutputs.

    Outputs are cumulative (full text and token ids so far), so when the
    consumer falls behind the engine, `__anext__` skips to the newest one
    without losing anything.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.finished = False
        # Set when an abort was asked for; the loop thread then delivers the final
        # output (finish_reason "abort") and drops the stream.
        self.abort_requested = False
        # The future `add_request` waits on until the loop thread has added it.
        self.accepted: concurrent.futures.Future | None = None
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand an output or an error to the consumer (called from the engine thread)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            # the consumer's event loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        # Skip ahead to the newest output; stop at an error or the final output.
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


class AsyncEngine:
    """Asyncio front of an LLMEngine whose steps run in one background thread.

    Args:
        engine: a built LLMEngine (the thread becomes its only user).
        start: start the loop thread now.
    """

    def __init__(self, engine: Any, *, start: bool = True) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._accepting = True
        self._dead_error: BaseException | None = None
        self._stats = None
        self._stats_lock = threading.Lock()
        self._dead_callbacks: list = []
        self._stop_sent = False
        self._consecutive_step_failures = 0
        self._thread = threading.Thread(
            target=self._run_loop, name="backplane-engine-loop", daemon=True
        )
        self._refresh_stats()
        if start:
            self.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, *, start: bool = True) -> AsyncEngine:
        """Build the LLMEngine (blocking: loads weights, sizes the KV cache) and wrap it."""
        from backplane.core.engine.llm_engine import LLMEngine

        return cls(LLMEngine.from_engine_args(engine_args), start=start)

    # ----- facts about the engine (read-only, safe from any thread) -----

    @property
    def config(self):
        """The engine's ResolvedConfig (frozen; `backplane.config.resolve`)."""
        return self.engine.config

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer

    @property
    def platform(self):
        """The Platform the engine runs on."""
        return self.engine.platform

    @property
    def errored(self) -> bool:
        """True when the loop thread died from an exception."""
        return self._dead_error is not None and not isinstance(self._dead_error, _Stopped)

    @property
    def dead_error(self) -> BaseException | None:
        """The exception that killed the loop thread, if any."""
        return None if isinstance(self._dead_error, _Stopped) else self._dead_error

    @property
    def is_running(self) -> bool:
        """True while the loop thread is alive and accepting requests."""
        return self._thread.is_alive() and self._dead_error is None and self._accepting

    @property
    def num_unfinished_requests(self) -> int:
        """Requests submitted through this front and not yet finished or aborted."""
        return len(self._streams)

    def get_stats(self):
        """The engine's latest stats snapshot (taken by the loop thread after each step)."""
        with self._stats_lock:
            return self._stats

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine cannot serve requests."""
        if self._dead_error is not None:
            raise self._unavailable()
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop thread is not running")

    # ----- lifecycle -----

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if not self._thread.is_alive() and self._dead_error is None:
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, abort those in flight, and join the loop thread.

        In-flight requests end with finish_reason "abort" (or `RequestAbortedError`
        if the engine has no final output for them). The server
        first lets uvicorn drain open connections, so normally none are left.
        """
        self._accepting = False
        # A second call (the server's lifespan, then its exit path) does not wait again
        # for a thread that is stuck in a long step.
        if self._thread.is_alive() and not self._stop_sent:
            self._stop_sent = True
            self._commands.put(_StopCommand())
            self._wakeup.set()
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine loop thread did not stop within %.0fs", timeout)
        if self._dead_error is None:
            self._dead_error = _Stopped("engine has been shut down")

    # ----- requests -----

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request=None,
    ) -> RequestStream:
        """Submit a request; return its output stream once the engine has accepted it.

        Raises ValueError (bad input, from `LLMEngine.add_request`) or
        EngineDeadError (engine not running). Waiting for acceptance lets the
        server answer 400 before it starts a streaming response.
        """
        stopped = self._stopped_error()
        if stopped is not None:
            raise stopped
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop)
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        stream.accepted = accepted
        self._streams[request_id] = stream
        self._submit(
            _AddCommand(
                request_id,
                prompt,
                params,
                priority,
                arrival_time,
                stream,
                accepted,
                lora_request,
            ),
            accepted,
        )
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            self.abort_nowait(request_id)
            raise
        except BaseException:
            if self._streams.get(request_id) is stream:
                self._streams.pop(request_id, None)
            raise
        return stream

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        lora_request=None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs until the request finishes.

        If the caller stops iterating early (client disconnect, task
        cancellation, `aclose()`), the request is aborted and its KV blocks freed.
        """
        stream = await self.add_request(request_id, prompt, params, priority,
                                        lora_request=lora_request)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort_nowait(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished).

        A consumer iterating its stream then gets the final output, with
        finish_reason "abort", and the iteration ends.
        """
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Queue an abort for ``request_id``; safe from any thread, never blocks."""
        stream = self._streams.get(request_id)
        if stream is None or stream.abort_requested:
            return
        stream.abort_requested = True
        if self._thread.is_alive():
            self._commands.put(_AbortCommand([request_id]))
            self._wakeup.set()
        else:
            self._streams.pop(request_id, None)
            stream.put(RequestAbortedError("request aborted"))

    def fail_all(self, reason: str) -> None:
        """End every request in flight with `RequestAbortedError(reason)`; keep serving.

        The server calls this when a graceful shutdown runs out of time, so that
        each open stream gets a final error event instead of being cut off. The
        streams get their error at once, from this thread, even if the loop thread
        is busy in a long step (a first compile); it aborts the requests (and
        frees their KV blocks) when it gets to the command.
        """
        for stream in list(self._streams.values()):
            stream.abort_requested = True
            if stream.accepted is not None:  # still waiting to be added: fail the add
                _set_future(stream.accepted, exc=RequestAbortedError(reason))
            stream.put(RequestAbortedError(reason))
        if self._thread.is_alive():
            self._commands.put(_FailAllCommand(reason))
            self._wakeup.set()

    def add_dead_callback(self, callback) -> None:
        """Call ``callback(exc)`` from the loop thread if the engine dies (not on shutdown)."""
        self._dead_callbacks.append(callback)

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, in the loop thread between two steps.

        Returns False, changing nothing, while any request holds KV blocks (as
        vLLM does); raises EngineDeadError when the engine is not running.
        """
        return await self._call_in_loop(lambda llm_engine: llm_engine.reset_prefix_cache())

    async def _call_in_loop(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(llm_engine)`` run by the loop thread (the engine's only user); its result."""
        stopped = self._stopped_error()
        if stopped is not None:
            raise stopped
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_CallCommand(fn, done), done)
        return await asyncio.wrap_future(done)

    def _submit(self, cmd: _AddCommand | _CallCommand, fut: concurrent.futures.Future) -> None:
        """Queue ``cmd`` for the loop thread and wake it; ``fut`` is the command's answer."""
        self._commands.put(cmd)
        self._wakeup.set()
        # The loop may have stopped or died between the caller's checks and the put; it
        # sets its state before draining the queue, so one of us fails the command.
        stopped = self._stopped_error()
        if stopped is not None:
            _set_future(fut, exc=stopped)

    # ----- the loop thread -----

    def _stopped_error(self) -> EngineDeadError | None:
        """Why a new request cannot be accepted now, or None if it can."""
        if self._dead_error is not None:
            return self._unavailable()
        if not self._accepting:
            return EngineDeadError("server is shutting down; not accepting new requests")
        if not self._thread.is_alive():
            return EngineDeadError("engine loop thread is not running")
        return None

    def _unavailable(self) -> EngineDeadError:
        err = self._dead_error
        if isinstance(err, _Stopped):
            return EngineDeadError(str(err))
        return EngineDeadError(f"engine loop died: {type(err).__name__}: {err}")

    def _refresh_stats(self) -> None:
        stats = self.engine.get_stats()
        with self._stats_lock:
            self._stats = stats

    def _run_loop(self) -> None:
        try:
            while True:
                # Clear before draining: a command queued after the drain sets it
                # again, so the wait below cannot miss it.
                self._wakeup.clear()
                if self._drain_commands():
                    self._close_engine()
                    return
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    # An engine-core process may die while nothing runs: /health
                    # must turn non-200 without waiting for the next request.
                    self._check_engine_alive()
                    self._refresh_stats()
                    self._wakeup.wait(_IDLE_WAKE_S)
        except BaseException as exc:  # noqa: BLE001 - any failure kills the loop
            logger.exception("engine loop died")
            self._dead_error = exc
            self._fail_all(self._unavailable())
            self._close_engine()
            for callback in self._dead_callbacks:
                try:
                    callback(exc)
                except Exception:  # noqa: BLE001 - a callback must not hide the death
                    logger.exception("engine death callback failed")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineDeadError:
            raise  # the engine-core process is gone: no step can succeed again
        except Exception as exc:
            self._consecutive_step_failures += 1
            if self._consecutive_step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            logger.exception(
                "engine step failed (%d in a row); failing the %d request(s) in flight and "
                "serving on", self._consecutive_step_failures, len(self._streams),
            )
            self._abort_in_flight(
                EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}")
            )
            return
        self._consecutive_step_failures = 0
        self._refresh_stats()
        self._dispatch(outputs)

    def _check_engine_alive(self) -> None:
        check = getattr(self.engine, "check_engine_alive", None)
        if check is not None:
            check()

    def _close_engine(self) -> None:
        """Stop the engine-core process, if the engine has one (from the loop thread)."""
        close = getattr(self.engine, "shutdown", None)
        if close is None:
            return
        try:
            close()
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.exception("engine shutdown failed")

    def _abort_in_flight(self, error: BaseException) -> None:
        """Abort every request in the engine (freeing its KV blocks); streams get ``error``."""
        ids = list(self._streams)
        self.engine.abort_request(ids)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
        self._refresh_stats()

    def _drain_commands(self) -> bool:
        """Apply queued commands; True when asked to stop.

        Calls run last, after the aborts queued with them, so that ``abort``
        then ``reset_prefix_cache`` finds the aborted request's blocks free.
        """
        aborts: list[str] = []
        calls: list[_CallCommand] = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _AddCommand):
                self._apply_add(cmd)
            elif isinstance(cmd, _AbortCommand):
                aborts.extend(cmd.request_ids)
            elif isinstance(cmd, _FailAllCommand):
                if self._streams:
                    logger.info("aborting %d request(s): %s", len(self._streams), cmd.reason)
                self._abort_in_flight(RequestAbortedError(cmd.reason))
            elif isinstance(cmd, _CallCommand):
                calls.append(cmd)
            elif isinstance(cmd, _StopCommand):
                self._abort_all_on_stop()
                for call in calls:
                    self._apply_call(call)
                return True
        if aborts:
            self._dispatch(self.engine.abort_request(aborts))
            # Requests the engine no longer knew (never added): end their streams too.
            for rid in aborts:
                stream = self._streams.get(rid)
                if stream is not None and stream.abort_requested:
                    self._streams.pop(rid, None)
                    stream.put(RequestAbortedError("request aborted"))
            self._refresh_stats()
        for call in calls:
            self._apply_call(call)
        return False

    def _apply_call(self, cmd: _CallCommand) -> None:
        if cmd.done.done():
            return  # the caller gave up, or the command was failed at submission
        try:
            result = cmd.fn(self.engine)
        except Exception as exc:  # report to that caller only
            _set_future(cmd.done, exc=exc)
        else:
            _set_future(cmd.done, result=result)

    def _apply_add(self, cmd: _AddCommand) -> None:
        if (
            cmd.accepted.cancelled()
            or cmd.stream.abort_requested
            or self._streams.get(cmd.request_id) is not cmd.stream
        ):
            # the caller gave up (or aborted) before we got to it
            if self._streams.get(cmd.request_id) is cmd.stream:
                self._streams.pop(cmd.request_id, None)
            _set_future(cmd.accepted, exc=RequestAbortedError("request aborted before it started"))
            return
        try:
            self.engine.add_request(
                cmd.request_id,
                cmd.prompt,
                cmd.params,
                priority=cmd.priority,
                arrival_time=cmd.arrival_time,
                lora_request=cmd.lora_request,
            )
        except Exception as exc:  # bad input: report to that caller only
            self._streams.pop(cmd.request_id, None)
            _set_future(cmd.accepted, exc=exc)
            return
        _set_future(cmd.accepted, result=True)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = (
                self._streams.pop(output.request_id, None)
                if output.finished
                else self._streams.get(output.request_id)
            )
            if stream is not None:
                stream.put(output)

    def _abort_all_on_stop(self) -> None:
        self._accepting = False
        ids = list(self._streams)
        if ids:
            logger.info("shutdown: aborting %d in-flight request(s)", len(ids))
            # Their consumers get the final outputs, with finish_reason "abort".
            self._dispatch(self.engine.abort_request(ids) or [])
        self._fail_all(RequestAbortedError("request aborted: the server is shutting down"))
        self._refresh_stats()

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(exc)
        # Fail adds and calls the thread never got to.
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _AddCommand):
                _set_future(cmd.accepted, exc=exc)
            elif isinstance(cmd, _CallCommand):
                _set_future(cmd.done, exc=exc)


class _Stopped(EngineDeadError):
    """Marker stored as the dead error after a clean shutdown."""


def _set_future(fut: concurrent.futures.Future, *, result=None, exc=None) -> None:
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by the caller in the meantime
