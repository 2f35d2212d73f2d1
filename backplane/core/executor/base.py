"""The executor: where the model runners of an engine live, and how a step reaches them.

The engine core owns one executor. Rank 0's `ModelRunner` (the driver) always
lives in the engine core's own process: it returns the step's results, and
the scheduler reads its KV capacity. Other ranks, when the model is split,
run the same runner code in their own processes and receive each step's plan
from the executor (see multiproc.py and ray_executor.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from backplane.core.engine.async_engine import EngineDeadError
from backplane.core.model_runner.runner import ModelRunner, ModelRunnerOutput
from backplane.core.scheduler.output import SchedulerOutput


class WorkerDiedError(EngineDeadError):
    """A rank's process ended (killed, out of memory, an exception): the engine cannot go on."""


class Executor(ABC):
    """Runs each step on every rank; the driver's result is the step's result."""

    runner: ModelRunner

    @abstractmethod
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run ``out`` on every rank; raises `WorkerDiedError` when a rank is gone."""

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
        self.check_health()
        data = self._wire.encode_plan(out, self._step)
        self._step += 1
        for sock in self.plan_socks:
            sock.send(data)
        try:
            return self.runner.execute(out)
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
