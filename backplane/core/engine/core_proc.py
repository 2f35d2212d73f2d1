"""The engine-core process: a busy loop around EngineCore, fed and drained over ZMQ.

`run_engine_core` is the target of the child process `core_client.MPClient`
spawns. It loads the general plugins and the platform the configuration was
resolved for (so out-of-tree platforms and attention backends exist here
too), seeds the global generator like the in-process engine does, builds the
EngineCore and reports READY. Then it loops: read every queued message
(adds, finishes, utility calls), step while any request is unfinished and
push each step's outputs with a stats snapshot; idle, it blocks on the input
socket for up to a second at a time, checking that its parent still exists.

A step that raises ends the requests in flight (their KV blocks freed) and is
reported (STEP_ERROR); the loop serves on, as the in-process engine does. An
error outside a step is reported (FATAL) and the process exits non-zero.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace
from types import MappingProxyType

logger = logging.getLogger(__name__)

# Idle wait on the input socket; also how often an idle child checks for its parent.
_IDLE_POLL_MS = 1000


def picklable_config(config):
    """``config`` (a ResolvedConfig) in a form spawn can pickle: its read-only mappings as dicts.

    The frozen sections, the HF config and the dtypes pickle as they are; the
    child rebuilds the same ResolvedConfig with `restored_config` and checks its
    hash against the parent's, so both processes run one configuration.
    """
    spec = config.model_spec
    return replace(config, model_spec=replace(
        spec, rope=dict(spec.rope), generation_defaults=dict(spec.generation_defaults)))


def restored_config(config):
    spec = config.model_spec
    return replace(config, model_spec=replace(
        spec, rope=MappingProxyType(spec.rope),
        generation_defaults=MappingProxyType(spec.generation_defaults)))


def run_engine_core(
    config, config_hash: str, input_addr: str, output_addr: str, parent_pid: int,
    dp_hint: dict | None = None,
) -> None:
    """Process entry point (spawn): serve ``config``'s engine core until told to stop.

    ``dp_hint`` (`core_client.dp_hints`): this child is one data-parallel rank; it
    claims its devices or cores before anything initialises the device.
    """
    import zmq

    # Ctrl-C reaches the whole process group; the front-end decides when the engine
    # stops (a shutdown message, else SIGTERM, which ends the loop like an exception).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from backplane.logging_utils import configure_logging

    configure_logging()
    if dp_hint is not None:
        _claim_dp_share(dp_hint)
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.LINGER, 0)
    inp.connect(input_addr)
    out = ctx.socket(zmq.PUSH)
    # Let a final FATAL report reach the front-end before the process goes.
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(output_addr)
    from backplane.core.engine import serial

    code = 0
    core = None
    try:
        config = restored_config(config)
        if config.compute_hash() != config_hash:
            raise RuntimeError(
                "the configuration rebuilt in the engine process differs from the "
                f"front-end's (hash {config.compute_hash()[:12]} != {config_hash[:12]})"
            )
        core = _build_core(config, dp_hint)
        from backplane.core.engine.core_client import core_stats

        out.send(serial.pack([serial.READY, core_stats(core)]))
        _busy_loop(core, inp, out, parent_pid)
    except SystemExit:
        pass  # SIGTERM
    except BaseException as exc:  # noqa: BLE001 - reported to the front-end, then exit 1
        logger.exception("engine core process failed")
        message = f"{type(exc).__name__}: {exc}"
        try:
            out.send(serial.pack([serial.FATAL, message]), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        code = 1
    finally:
        close = getattr(core, "shutdown", None)  # its own worker thread, if any
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - leaving anyway
                logger.exception("engine core shutdown failed")
        inp.close(0)
        out.close()
        ctx.term()
    sys.exit(code)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def _claim_dp_share(hint: dict) -> None:
    """Take this data-parallel rank's share of the host (in the child, at start-up).

    Devices: the platform's visible-devices variable lists this rank's devices
    (set before the device is initialised; the ranks its executor spawns inherit
    it). cpu: pinned to cores [i*n/K, (i+1)*n/K) of those this process may use
    (round robin when ranks outnumber cores), torch's pool sized to them; an
    explicit OMP_NUM_THREADS still sets the pool size.
    """
    rank, size = hint["rank"], hint["size"]
    for name, value in hint["env"].items():
        os.environ[name] = value
        logger.info("data-parallel rank %d of %d: %s=%s", rank, size, name, value)
    if not hint["cpu_share"] or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if size <= len(cores):
        mine = cores[rank * len(cores) // size:(rank + 1) * len(cores) // size]
    else:
        mine = [cores[rank % len(cores)]]
    os.sched_setaffinity(0, mine)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(len(mine))
    logger.info("data-parallel rank %d of %d pinned to cores %s", rank, size, mine)


def _share_memory(platform, share: int) -> None:
    """Make the platform report 1/``share`` of the free memory, so that engine cores
    sharing one device (the cpu's host memory) size their KV caches from their part."""
    runtime = platform.runtime
    available = runtime.available_memory

    def available_share(index: int = 0) -> int:
        return available(index) // share

    runtime.available_memory = available_share


def _build_core(config, dp_hint: dict | None = None):
    from backplane.core.engine.engine_core import EngineCore
    from backplane.core.engine.llm_engine import LLMEngine
    from backplane.platforms import resolve_platform

    LLMEngine._load_general_plugins()
    platform = resolve_platform(config.platform_name)
    if platform.name != config.platform_name:
        raise RuntimeError(
            f"the configuration was resolved for platform {config.platform_name!r} but the "
            f"engine process selected {platform.name!r}"
        )
    if dp_hint is not None and dp_hint["memory_share"] > 1:
        _share_memory(platform, dp_hint["memory_share"])
    # Same order as in-process: seed, then build, so sampling draws the same numbers.
    platform.runtime.seed_everything(config.model_config.seed)
    return EngineCore(config, platform)


def _busy_loop(core, inp, out, parent_pid: int) -> None:
    import zmq

    from backplane.core.engine import serial
    from backplane.core.engine.async_engine import EngineDeadError
    from backplane.core.engine.core_client import core_stats

    while True:
        if os.getppid() != parent_pid:
            logger.warning("the front-end process %d is gone; engine core exits", parent_pid)
            return
        busy = core.has_unfinished_requests()
        if not busy and not inp.poll(_IDLE_POLL_MS):
            # Idle: a rank of a split model may still die; that ends this process
            # (FATAL), so the front-end's /health turns non-200 without a request.
            core.check_health()
            continue
        changed = False
        while True:
            try:
                message = serial.unpack(inp.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            if message[0] == serial.SHUTDOWN:
                return
            _apply(core, message, out)
            changed = True
        if core.has_unfinished_requests():
            try:
                outputs = core.step()
            except EngineDeadError:
                raise  # a rank of the model is gone: no later step can run (FATAL)
            except Exception as exc:  # noqa: BLE001 - fail the batch, serve on
                logger.exception("engine core step failed")
                failed = _abort_all(core)
                out.send(serial.pack([
                    serial.STEP_ERROR, f"{type(exc).__name__}: {exc}", failed, core_stats(core),
                ]))
                continue
            out.send(serial.pack([
                serial.OUTPUTS, [serial.encode_output(o) for o in outputs], core_stats(core),
                serial.encode_timing(core.last_step),
            ]))
        elif changed:
            # Nothing to step (e.g. an abort): the stats still changed.
            out.send(serial.pack([serial.OUTPUTS, [], core_stats(core), None]))


def _apply(core, message: list, out) -> None:
    from backplane.core.engine import serial
    from backplane.core.scheduler.request import RequestStatus

    kind = message[0]
    if kind == serial.ADD:
        for data in message[1]:
            core.add_request(serial.decode_request(data))
    elif kind == serial.FINISH:
        core.finish_requests(message[1], RequestStatus(message[2]))
    elif kind == serial.UTILITY:
        _, call_id, method = message
        result, error = None, None
        try:
            if method == "reset_prefix_cache":
                result = bool(core.scheduler.kv.reset_prefix_cache())
            else:
                raise ValueError(f"unknown utility call {method!r}")
        except Exception as exc:  # noqa: BLE001 - answered to that caller
            error = f"{type(exc).__name__}: {exc}"
        out.send(serial.pack([serial.UTILITY_RESULT, call_id, result, error]))
    else:
        raise ValueError(f"unknown message kind {kind!r} from the front-end")


def _abort_all(core) -> list[str]:
    """End every request the core holds (freeing its KV blocks); their ids."""
    from backplane.core.scheduler.request import RequestStatus

    ids = list(core.scheduler.requests)
    try:
        core.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
    except Exception:  # noqa: BLE001 - the failure is reported with the step's
        logger.exception("engine core could not free the failed requests")
    return ids
