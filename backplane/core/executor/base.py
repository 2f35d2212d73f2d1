"""The executor: where the model runners of an engine live, and how a step reaches them.

The engine core owns one executor. Rank 0's `ModelRunner` (the driver) always
lives in the engine core's own process: it returns the step's results, and
the scheduler reads its KV capacity. Other ranks, when the model is split,
run the same runner code in their own processes and receive each step's plan
from the executor (see multiproc.py and ray_executor.py).
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from backplane.core.engine.async_engine import EngineDeadError
from backplane.core.model_runner.runner import LaunchedStep, ModelRunner, ModelRunnerOutput
from backplane.core.scheduler.output import SchedulerOutput


class WorkerDiedError(EngineDeadError):
    """A rank's process ended (killed, out of memory, an exception): the engine cannot go on."""


# How long the ranks of a split model may take to load their slices and join.
STARTUP_TIMEOUT_S = float(os.environ.get("BACKPLANE_WORKER_STARTUP_TIMEOUT", "600"))


def run_while_watching(fn: Callable, what: str, failure: Callable[[float], str | None],
                       hint: str = "", done: Callable[[], bool] = lambda: True):
    """Run ``fn`` (which waits for the other ranks) on a thread, polling ``failure(grace_s)``
    for a rank that died meanwhile, so that start-up fails at once, naming it, instead
    of waiting for the other ranks until a timeout. ``done`` (polled once ``fn`` has
    returned) may hold the wait until the other ranks finished too."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"backplane-{what}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        thread.join(0.1)
        found = failure(0.0)
        if found is not None:
            raise WorkerDiedError(f"a worker failed while {what}: {found}{hint}")
        if not thread.is_alive() and ("error" in box or done()):
            break
        if time.monotonic() > deadline:
            raise WorkerDiedError(f"the workers took longer than {STARTUP_TIMEOUT_S:.0f} s "
                                  f"{what} (BACKPLANE_WORKER_STARTUP_TIMEOUT)")
    if "error" in box:
        # Our side failed: most likely because a rank died; wait a little for its report.
        found = failure(2.0)
        if found is not None:
            raise WorkerDiedError(f"a worker failed while {what}: {found}{hint}") \
                from box["error"]
        raise box["error"]
    return box.get("value")


class Executor(ABC):
    """Runs each step on every rank; the driver's result is the step's result."""

    runner: ModelRunner

    @abstractmethod
    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Start ``out`` on every rank; raises `WorkerDiedError` when a rank is gone."""

    @abstractmethod
    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        """Finish the oldest launched step on every rank (the driver's result)."""

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run ``out`` to the end on every rank."""
        return self.collect(self.launch(out))

    def check_health(self) -> None:  # noqa: B027 - nothing to check in one process
        """Raise `WorkerDiedError` when a rank can no longer serve (idle check)."""

    def shutdown(self) -> None:  # noqa: B027 - nothing to stop in one process
        """Stop the other ranks and leave the process group (idempotent)."""


class PlanBroadcastExecutor(Executor):
    """Rank 0 in this process; the other ranks are sent each step's plan first.

    Subclasses (mp, ray) start the other ranks, bind one ZMQ PUSH socket per rank
    in ``plan_socks``, build ``runner`` and set ``failure`` (a description) from a
    watcher when a rank dies; `failure_after` may wait a little for that report.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process (another split "
                "engine that was not shut down, or a launcher): shut that engine down first "
                "(llm.llm_engine.shutdown()), or use distributed_executor_backend="
                "'external_launcher' to run inside an existing world")
        # Here, not at module level: wire -> serial -> engine_core -> executor is a cycle.
        from backplane.core.executor import wire

        self._wire = wire
        self.plan_socks: list = []
        self.failure: str | None = None
        self._step = 0

    def failure_after(self, grace_s: float) -> str | None:
        """The failure of a rank, waiting up to ``grace_s`` for it to be noticed."""
        return self.failure

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        # One message: the workers launch and collect at once.
        self._send_plan(out, collect=True)
        return self._on_driver(lambda: self.runner.execute(out))

    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        self._send_plan(out, collect=False)
        return self._on_driver(lambda: self.runner.launch(out))

    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        self.check_health()
        data = self._wire.encode_collect()
        for sock in self.plan_socks:
            sock.send(data)
        return self._on_driver(lambda: self.runner.collect(launched))

    def _send_plan(self, out: SchedulerOutput, collect: bool) -> None:
        self.check_health()
        data = self._wire.encode_plan(out, self._step, collect)
        self._step += 1
        for sock in self.plan_socks:
            sock.send(data)

    def _on_driver(self, run: Callable):
        """Rank 0's part of a step; a failure there is reported as the rank that died,
        or as the ranks being out of step."""
        try:
            return run()
        except Exception as exc:
            # A rank's death surfaces here as a collective that failed; name the rank.
            failure = self.failure_after(grace_s=3.0)
            if failure is not None:
                raise WorkerDiedError(failure) from exc
            # The ranks are out of step now (one failed, the others did not): nothing
            # can run safely any more.
            raise WorkerDiedError(f"a step failed on rank 0 and the ranks can no longer "
                                  f"agree: {type(exc).__name__}: {exc}") from exc

    def check_health(self) -> None:
        if self.failure is not None:
            raise WorkerDiedError(self.failure)

    def send_shutdown(self) -> None:
        """Tell every rank to leave (without waiting: a dead rank cannot take it)."""
        for sock in self.plan_socks:
            try:
                sock.send(self._wire.encode_shutdown(), flags=1)  # zmq.NOBLOCK
            except Exception:  # noqa: BLE001 - a dead worker cannot take it
                pass
