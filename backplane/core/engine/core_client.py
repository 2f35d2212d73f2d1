"""How the front-end (LLMEngine) talks to the engine core: in-process or in a child process.

`InprocClient` calls an `EngineCore` directly (one process, step by step).
`MPClient` runs the engine core in a child process (`core_proc`) started with
``spawn`` (so the child may initialise CUDA) and talks to it over two ZMQ
sockets: requests, finishes and utility calls go down a PUSH socket, outputs
come back on a PULL socket, each message msgpack-encoded by `serial`. The
child steps on its own while it has work, so tokenization, detokenization and
HTTP in the front-end process overlap with the model's steps.

Engine death: while the front-end waits for outputs it also watches the
child's process sentinel, so a killed or crashed engine process turns into an
`EngineDeadError` at once (and `check_alive` reports it between steps). The
child is stopped with a shutdown message, then SIGTERM, then SIGKILL (each
with a timeout), also from an atexit hook; it exits by itself when its
parent disappears.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import weakref
from abc import ABC, abstractmethod
from typing import Any

from backplane.core.engine import serial
from backplane.core.engine.async_engine import EngineDeadError
from backplane.core.engine.engine_core import EngineCore, EngineCoreOutput, StepTiming
from backplane.core.scheduler.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# Longest single wait on the output socket; the process sentinel wakes it sooner on death.
_POLL_SLICE_MS = 1000
# Shutdown: how long the child gets to leave after the message, then after SIGTERM.
_SHUTDOWN_WAIT_S = 5.0
_TERMINATE_WAIT_S = 3.0


class EngineProcessDiedError(EngineDeadError):
    """The engine-core process exited (killed, crashed) while the front-end still ran."""


def core_stats(core: EngineCore) -> dict[str, Any]:
    """The scheduler and KV-cache numbers `LLMEngine.get_stats` reports, as plain data."""
    sched = core.scheduler
    kv = sched.kv
    return {
        "num_running": sched.num_running,
        "num_waiting": sched.num_waiting,
        "num_total_blocks": kv.pool.num_blocks,
        "num_free_blocks": kv.num_free_blocks,
        "kv_cache_usage": kv.usage,
        "prefix_cache_queries": kv.prefix_stats.queries,
        "prefix_cache_hits": kv.prefix_stats.hits,
        "num_preemptions": sched.num_preemptions,
        "block_size": kv.block_size,
        "spec_decode": (None if core.config.speculative_config is None
                        else dataclasses.asdict(sched.spec_stats)),
    }


class EngineCoreClient(ABC):
    """What LLMEngine needs from an engine core, wherever it runs."""

    engine_pid: int | None = None

    @abstractmethod
    def add_requests(self, requests: list[Request]) -> None:
        """Queue requests (the sequences of one user request, already validated)."""

    @abstractmethod
    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """End requests from outside a step (abort, stop string), freeing their KV blocks."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool:
        """Whether a step may still produce outputs."""

    @abstractmethod
    def step(self) -> list[EngineCoreOutput]:
        """The outputs of the next step."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """The `core_stats` of the engine core (the latest snapshot, for a child)."""

    @property
    @abstractmethod
    def last_step(self) -> StepTiming:
        """Timing of the engine core's latest step."""

    @abstractmethod
    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False while a request holds KV blocks."""

    @abstractmethod
    def check_alive(self) -> None:
        """Raise EngineDeadError when the engine core can no longer serve."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the engine core (idempotent)."""


class InprocClient(EngineCoreClient):
    """The engine core in this process: every call goes straight to it."""

    def __init__(self, engine_core: EngineCore) -> None:
        self.engine_core = engine_core

    def add_requests(self, requests: list[Request]) -> None:
        for request in requests:
            self.engine_core.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.engine_core.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        return self.engine_core.step()

    def stats(self) -> dict[str, Any]:
        return core_stats(self.engine_core)

    @property
    def last_step(self) -> StepTiming:
        return self.engine_core.last_step

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.scheduler.kv.reset_prefix_cache()

    def check_alive(self) -> None:
        # The core lives and dies with this process; the other ranks of a split model
        # may not (a failed step raises from step() too).
        self.engine_core.check_health()

    def shutdown(self) -> None:
        # The core may hold a worker thread of its own (async scheduling).
        close = getattr(self.engine_core, "shutdown", None)
        if close is not None:
            close()


class MPClient(EngineCoreClient):
    """The engine core in a spawned child process, over ZMQ (see the module docstring).

    Not thread-safe: one thread (the LLM caller, or AsyncEngine's loop thread)
    makes every call, as with the in-process engine.
    """

    def __init__(self, config, *, dp_hint: dict | None = None, wait: bool = True) -> None:
        """``dp_hint``: this core's data-parallel rank and share of the host (`DPClient`);
        ``wait=False`` returns once the child started (call `wait_ready` later)."""
        import zmq

        from backplane.core.engine.core_proc import picklable_config, run_engine_core

        self._zmq = zmq
        self._closed = False
        self._dead: EngineDeadError | None = None
        self._unfinished: set[str] = set()
        self._pending_adds: list[list] = []
        self._pending_outputs: list[EngineCoreOutput] = []
        self._deferred_error: Exception | None = None
        self._utility_results: dict[int, list] = {}
        self._call_ids = itertools.count()
        self._last_step = StepTiming()
        self._stats: dict[str, Any] = {}
        self._max_model_len = config.max_model_len
        rank = None if dp_hint is None else dp_hint["rank"]
        # How errors name the child ("engine core process" is kept for callers matching it).
        self._label = ("engine core process" if rank is None
                       else f"engine core process of data-parallel rank {rank}")
        # ipc sockets live in a private directory, removed at shutdown.
        self._ipc_dir = tempfile.mkdtemp(prefix="backplane-engine-")
        input_addr = f"ipc://{self._ipc_dir}/input"
        output_addr = f"ipc://{self._ipc_dir}/output"
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(input_addr)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(output_addr)
        # spawn: a fresh interpreter, so CUDA can initialise in the child (fork would
        # copy this process's state, threads and any CUDA context it holds).
        mp = multiprocessing.get_context("spawn")
        # Not a daemon: a daemonic process may not start children of its own
        # (compile workers); the atexit hook below stops it instead.
        self._proc = mp.Process(
            target=run_engine_core,
            name="backplane-engine-core" + ("" if rank is None else f"-dp{rank}"),
            args=(picklable_config(config), config.compute_hash(), input_addr, output_addr,
                  os.getpid(), dp_hint),
        )
        self._proc.start()
        self.engine_pid = self._proc.pid
        # A weak reference, so that the hook does not keep a dropped engine alive.
        self._atexit = _make_atexit_hook(weakref.ref(self))
        atexit.register(self._atexit)
        self._poller = zmq.Poller()
        self._poller.register(self._output, zmq.POLLIN)
        self._poller.register(self._proc.sentinel, zmq.POLLIN)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the child built its engine core; on failure, stop it and raise."""
        try:
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        logger.info("%s runs in process %d", self._label, self.engine_pid)

    # ----- requests -----

    def add_requests(self, requests: list[Request]) -> None:
        # Sent with the next step (or any other message), so that requests added
        # together reach the engine together and are scheduled as one batch.
        for request in requests:
            self._pending_adds.append(serial.encode_request(request, self._max_model_len))
            self._unfinished.add(request.request_id)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        if not request_ids:
            return
        self._send([serial.FINISH, list(request_ids), status.value])
        self._unfinished.difference_update(request_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished) or bool(self._pending_outputs)

    def step(self, block: bool | None = None) -> list[EngineCoreOutput]:
        """The next outputs: blocks while requests are unfinished, else only polls
        (``block=False``: never blocks)."""
        self._flush_adds()
        if not self._pending_outputs and self._deferred_error is None:
            self._receive(block=bool(self._unfinished) if block is None else block)
        outputs, self._pending_outputs = self._pending_outputs, []
        if not outputs and self._deferred_error is not None:
            error, self._deferred_error = self._deferred_error, None
            raise error
        return outputs

    def stats(self) -> dict[str, Any]:
        if not self._closed and self._dead is None:
            self._receive(block=False)  # pick up the snapshot sent after an abort
        return self._stats

    @property
    def last_step(self) -> StepTiming:
        return self._last_step

    def reset_prefix_cache(self) -> bool:
        return bool(self._call("reset_prefix_cache"))

    # ----- liveness and shutdown -----

    def check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise EngineDeadError("the engine core has been shut down")
        if not self._proc.is_alive():
            # A FATAL report sent just before it exited names the cause (raised by _handle).
            while self._output.poll(0):
                self._handle(serial.unpack(self._output.recv(self._zmq.NOBLOCK)))
            raise self._died()

    def shutdown(self) -> None:
        """Ask the child to leave, then SIGTERM, then SIGKILL; close the sockets."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        if self._proc.is_alive():
            self.ask_to_leave()
            self._proc.join(_SHUTDOWN_WAIT_S)
        _stop_process(self._proc)
        self._input.close(0)
        self._output.close(0)
        self._ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def ask_to_leave(self) -> None:
        """Send the shutdown message without waiting (`shutdown` then waits for the exit)."""
        if self._input.closed:
            return
        try:
            self._input.send(serial.pack([serial.SHUTDOWN]), self._zmq.NOBLOCK)
        except self._zmq.ZMQError:
            pass  # nobody reads any more: SIGTERM in shutdown

    def __del__(self) -> None:
        # A dropped engine must not leave its process behind (signals only: no sockets).
        proc = getattr(self, "_proc", None)
        if proc is not None and not getattr(self, "_closed", True):
            _stop_process(proc)

    # ----- messages -----

    def _send(self, message: list) -> None:
        self.check_alive()
        self._flush_adds()
        self._input.send(serial.pack(message))

    def _flush_adds(self) -> None:
        if self._pending_adds:
            self.check_alive()
            adds, self._pending_adds = self._pending_adds, []
            self._input.send(serial.pack([serial.ADD, adds]))

    def _call(self, method: str) -> Any:
        """A request/reply call into the engine core, ordered after every earlier message."""
        call_id = next(self._call_ids)
        self._send([serial.UTILITY, call_id, method])
        while call_id not in self._utility_results:
            self._receive(block=True, until_reply=True)
        result, error = self._utility_results.pop(call_id)
        if error is not None:
            raise RuntimeError(f"engine core {method} failed: {error}")
        return result

    def _receive(self, block: bool, until_reply: bool = False) -> None:
        """Read what the child sent: with ``block``, wait until at least one message came."""
        self.check_alive()
        while block:
            events = dict(self._poller.poll(_POLL_SLICE_MS))
            if self._output in events:
                break
            if self._proc.sentinel in events or not self._proc.is_alive():
                # Messages sent just before it died still count (a FATAL report).
                if not self._output.poll(0):
                    raise self._died()
                break
        while True:
            try:
                data = self._output.recv(self._zmq.NOBLOCK)
            except self._zmq.Again:
                return
            self._handle(serial.unpack(data))
            if until_reply and self._utility_results:
                return

    def _handle(self, message: list) -> None:
        kind = message[0]
        if kind == serial.OUTPUTS:
            _, outputs, stats, timing = message
            for data in outputs:
                out = serial.decode_output(data)
                # Outputs of requests the front-end already ended (an abort, a stop
                # string) were stepped before the finish reached the child: dropped.
                if out.request_id in self._unfinished:
                    self._pending_outputs.append(out)
                    if out.finish_status is not None:
                        self._unfinished.discard(out.request_id)
            self._stats = stats
            if timing is not None:
                self._last_step = serial.decode_timing(timing)
        elif kind == serial.STEP_ERROR:
            _, error, failed_ids, stats = message
            self._stats = stats
            self._unfinished.difference_update(failed_ids)
            # Outputs received before the failure are delivered first.
            self._deferred_error = RuntimeError(f"engine core step failed: {error}")
        elif kind == serial.UTILITY_RESULT:
            _, call_id, result, error = message
            self._utility_results[call_id] = [result, error]
        elif kind == serial.FATAL:
            self._dead = EngineProcessDiedError(
                f"{self._label} (pid {self.engine_pid}) failed: {message[1]}")
            raise self._dead
        else:
            raise RuntimeError(f"unexpected message from the engine core: {kind!r}")

    def _wait_ready(self) -> None:
        """Block until the child built its engine core (or failed to)."""
        zmq = self._zmq
        while True:
            events = dict(self._poller.poll(_POLL_SLICE_MS))
            if self._output in events or self._output.poll(0):
                message = serial.unpack(self._output.recv(zmq.NOBLOCK))
                if message[0] == serial.READY:
                    self._stats = message[1]
                    return
                if message[0] == serial.FATAL:
                    raise RuntimeError(f"the {self._label} failed to start: {message[1]}")
                raise RuntimeError(f"unexpected first message from the engine core: {message[0]!r}")
            if self._proc.sentinel in events or not self._proc.is_alive():
                self._proc.join(1)
                raise RuntimeError(
                    f"the {self._label} (pid {self.engine_pid}) exited during start-up "
                    f"({describe_exit(self._proc.exitcode)}); see its log above. A script "
                    "that starts an engine process must guard its entry point with "
                    "`if __name__ == \"__main__\":` (the child re-imports the main module)"
                )

    def _died(self) -> EngineDeadError:
        self._proc.join(0.5)
        self._dead = EngineProcessDiedError(
            f"{self._label} (pid {self.engine_pid}) died "
            f"({describe_exit(self._proc.exitcode)})"
        )
        logger.error("%s", self._dead)
        return self._dead



def describe_exit(code: int | None) -> str:
    """How a process ended, from its exit code ("killed by SIGKILL", "exit code 1")."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stop_process(proc) -> None:
    """SIGTERM, then SIGKILL, each with a timeout; reaps the child."""
    if proc.is_alive():
        proc.terminate()
        proc.join(_TERMINATE_WAIT_S)
    if proc.is_alive():
        logger.warning("engine core process %d ignored SIGTERM; killing it", proc.pid)
        proc.kill()
        proc.join(_TERMINATE_WAIT_S)


def _make_atexit_hook(ref: weakref.ref):
    def hook() -> None:
        # Signals only, no sockets: the thread that owns them may still be running.
        client = ref()
        if client is not None and not client._closed:
            _stop_process(client._proc)

    return hook
