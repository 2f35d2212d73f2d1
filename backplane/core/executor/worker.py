"""A rank other than 0: builds its slice of the model, then runs every step it is sent.

`run_worker` is the target of the processes `MultiprocExecutor` spawns (and
the body of a Ray actor's loop). It loads the general plugins and the
platform the configuration was resolved for, as the engine process does,
pins itself to its share of the host (``platform.init_worker``), joins the
world, builds a `ModelRunner` (which loads only this rank's weight slices)
and then executes each plan the driver sends, in order. It exits when told
to, when its parent disappears, or on any error, which it reports first with
its rank so the driver can name the cause.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections import deque

logger = logging.getLogger(__name__)

READY = "ready"
FAILED = "failed"

# How often an idle worker checks that the engine that started it still exists.
_IDLE_POLL_MS = 1000


def build_worker_runner(config, rank: int, init_method: str | None, local_rank: int,
                        local_world_size: int):
    """Platform, plugins, process group and this rank's model runner."""
    from backplane.core.distributed.parallel_state import init_model_parallel
    from backplane.core.engine.llm_engine import LLMEngine
    from backplane.core.model_runner.runner import ModelRunner
    from backplane.platforms import resolve_platform

    LLMEngine._load_general_plugins()
    platform = resolve_platform(config.platform_name)
    platform.init_worker(local_rank, local_world_size)
    pc = config.parallel_config
    init_model_parallel(platform, rank=rank, tensor_parallel_size=pc.tensor_parallel_size,
                        pipeline_parallel_size=pc.pipeline_parallel_size,
                        init_method=init_method, local_rank=local_rank,
                        local_world_size=local_world_size)
    # The same seed as the driver: every rank's sampler draws the same numbers.
    platform.runtime.seed_everything(config.model_config.seed)
    return ModelRunner(config, platform)


def run_worker(config, rank: int, init_method: str, plan_addr: str, reports, parent_pid: int,
               local_rank: int, local_world_size: int) -> None:
    """Process entry point (spawn): serve rank ``rank`` until shut down."""
    import zmq

    from backplane.core.engine.core_proc import restored_config
    from backplane.logging_utils import configure_logging

    # Ctrl-C reaches the whole process group; the driver decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    configure_logging()
    # Wherever this process blocks (joining the world, loading, a collective), it must
    # not outlive the engine that started it.
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                     name="backplane-parent-watch").start()
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(plan_addr)
    try:
        runner = build_worker_runner(restored_config(config), rank, init_method, local_rank,
                                     local_world_size)
        reports.put((READY, rank, None))
        serve_plans(runner, lambda: _receive(sock, parent_pid))
    except BaseException as exc:  # noqa: BLE001 - reported, then the process ends
        reports.put((FAILED, rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from exc
    finally:
        sock.close()


def serve_plans(runner, receive) -> None:
    """Launch and collect the steps ``receive()`` returns, in order, until it returns
    None or a shutdown. Launched steps wait here for their COLLECT (a pipeline keeps
    several in flight)."""
    from backplane.core.executor.wire import COLLECT, LAUNCH, decode_message, decode_plan

    expected = 0
    launched: deque = deque()
    while (data := receive()) is not None:
        message = decode_message(data)
        if message[0] == COLLECT:
            runner.collect(launched.popleft())
            continue
        if message[0] != LAUNCH:
            return
        _, step, collect, plan = message
        if step != expected:
            raise RuntimeError(f"received step {step}, expected step {expected}: the plans "
                               "reaching this rank are out of order")
        expected += 1
        started = runner.launch(decode_plan(plan))
        if collect:
            runner.collect(started)
        else:
            launched.append(started)


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_IDLE_POLL_MS / 1000)
        if os.getppid() != parent_pid:
            logger.warning("the engine process %d is gone; this worker exits", parent_pid)
            from backplane.core.distributed.parallel_state import close_communicators

            close_communicators()  # os._exit skips atexit: remove shared memory first
            os._exit(1)


def _receive(sock, parent_pid: int) -> bytes | None:
    """The next message; None when the parent is gone (so no worker outlives its engine)."""
    while not sock.poll(_IDLE_POLL_MS):
        if os.getppid() != parent_pid:
            logger.warning("the engine process %d is gone; this worker exits", parent_pid)
            return None
    return sock.recv()
