"""One process per rank on this host (``distributed_executor_backend="mp"``).

Rank 0 runs in the engine core's process; ranks 1..N-1 are spawned children
(`worker.run_worker`). Each step's plan is msgpack-encoded once (wire.py) and
pushed to every child over a ZMQ IPC socket before the driver runs it, so the
ranks work on the same step at the same time and meet in the runners'
collectives; no pickling happens per step.

A child that dies (killed, out of memory, an exception) is noticed by a
watcher thread within a fraction of a second: the next or current step
raises `WorkerDiedError` naming the rank and its reason (the exception it
reported, or the signal that ended it), which ends the engine (the server's
/health turns 503 and in-flight requests fail). Shutdown stops every child
and removes the sockets' files.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from multiprocessing.connection import wait

import torch

from backplane.core.distributed.parallel_state import destroy_model_parallel, init_model_parallel
from backplane.core.engine.core_client import describe_exit
from backplane.core.executor.base import (
    STARTUP_TIMEOUT_S,
    PlanBroadcastExecutor,
    WorkerDiedError,
    run_while_watching,
)
from backplane.core.executor.worker import READY, run_worker
from backplane.core.model_runner.runner import ModelRunner

logger = logging.getLogger(__name__)



# Workers are spawned: they re-import the main module of the program.
_MAIN_HINT = ("; see its log above. A script that starts workers must guard its entry point "
              "with `if __name__ == \"__main__\":` (each worker re-imports the main module)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(PlanBroadcastExecutor):
    """The driver here, the other ranks in child processes on this host."""

    def __init__(self, config, platform) -> None:
        import zmq

        from backplane.core.engine.core_proc import picklable_config

        pc = config.parallel_config
        self.world_size = pc.tensor_parallel_size * pc.pipeline_parallel_size
        super().__init__()
        self._ready: set[int] = set()
        self._closed = False
        self._ipc_dir = tempfile.mkdtemp(prefix="backplane-workers-")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = multiprocessing.get_context("spawn")
        self._reports = ctx.Queue()
        self._zmq = zmq.Context.instance()
        self.workers: list[multiprocessing.Process] = []
        shipped = picklable_config(config)
        for rank in range(1, self.world_size):
            addr = f"ipc://{self._ipc_dir}/rank{rank}"
            sock = self._zmq.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(addr)
            self.plan_socks.append(sock)
            proc = ctx.Process(
                target=run_worker, name=f"backplane-worker-{rank}", daemon=True,
                args=(shipped, rank, init_method, addr, self._reports, os.getpid(), rank,
                      self.world_size))
            proc.start()
            self.workers.append(proc)
        # init_worker pins this process to rank 0's share of the host; put it back at
        # shutdown (the engine may live in a program that goes on without it).
        self._affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self._threads = torch.get_num_threads()
        try:
            platform.init_worker(0, self.world_size)
            self._while_watching(lambda: init_model_parallel(
                platform, rank=0, tensor_parallel_size=pc.tensor_parallel_size,
                pipeline_parallel_size=pc.pipeline_parallel_size, init_method=init_method,
                local_rank=0, local_world_size=self.world_size,
                timeout_s=STARTUP_TIMEOUT_S), "joining the process group")
            self.runner = self._while_watching(lambda: ModelRunner(config, platform),
                                               "loading the model")
            self._await_ready()
        except BaseException:
            self.shutdown()
            raise
        self._watcher = threading.Thread(target=self._watch, name="backplane-worker-watch",
                                         daemon=True)
        self._watcher.start()
        logger.info("mp executor: %d ranks (tensor parallel %d x pipeline parallel %d), "
                    "workers %s", self.world_size, pc.tensor_parallel_size,
                    pc.pipeline_parallel_size, [w.pid for w in self.workers])

    # ------------------------------------------------------------ start-up
    def _while_watching(self, fn, what: str):
        return run_while_watching(fn, what, lambda grace: self._collect_failure(grace_s=grace),
                                  hint=_MAIN_HINT)

    def _await_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(self._ready) < len(self.workers):
            failure = self._collect_failure()
            if failure is not None:
                raise WorkerDiedError(f"a worker failed to start: {failure}")
            if time.monotonic() > deadline:
                raise WorkerDiedError(f"the workers took longer than {STARTUP_TIMEOUT_S:.0f} s "
                                      "to start (BACKPLANE_WORKER_STARTUP_TIMEOUT)")
            time.sleep(0.05)

    def _drain_reports(self) -> str | None:
        """Read the workers' reports; the first failure's description, if any."""
        while True:
            try:
                kind, rank, detail = self._reports.get_nowait()
            except queue.Empty:
                return None
            if kind == READY:
                self._ready.add(rank)
            else:
                return f"worker rank {rank} failed: {detail}"

    def _collect_failure(self, grace_s: float = 0.0) -> str | None:
        """A description of the first rank that failed or died, if any.

        A rank that died by an exception reported it first; its report may still be
        in flight when its process is already gone, hence a short grace period.
        """
        deadline = time.monotonic() + grace_s
        dead = None
        while True:
            reported = self._drain_reports()
            if reported is not None:
                return reported
            if dead is None:
                for rank, proc in enumerate(self.workers, start=1):
                    if not proc.is_alive():
                        dead = (f"worker rank {rank} (pid {proc.pid}) "
                                f"{describe_exit(proc.exitcode)}")
                        deadline = max(deadline, time.monotonic() + 0.5)
                        break
            if time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    # ------------------------------------------------------------ serving
    def _watch(self) -> None:
        """Notice a dying worker at once, even while the driver waits in a collective."""
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self.workers, start=1)}
        wait(list(sentinels))
        if self._closed:
            return
        self.failure = self._collect_failure(grace_s=0.5)
        logger.error("%s; the engine stops", self.failure)

    def failure_after(self, grace_s: float) -> str | None:
        return self.failure or self._collect_failure(grace_s=grace_s)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.send_shutdown()
        for proc in self.workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for sock in self.plan_socks:
            sock.close()
        self._reports.close()
        destroy_model_parallel()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity)
        torch.set_num_threads(self._threads)
