"""Data parallelism: K engine cores, each in its own process, behind one front-end.

`DPClient` owns one `MPClient` per data-parallel rank and routes each request
to the least loaded core; `dp_hints` gives each rank's child its devices (the
platform's visible-devices variable) or its share of the cpu cores and memory.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from backplane.core.engine.async_engine import EngineDeadError
from backplane.core.engine.core_client import EngineCoreClient, EngineProcessDiedError, MPClient
from backplane.core.engine.engine_core import EngineCoreOutput, StepTiming
from backplane.core.scheduler.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# Longest wait of one DPClient.step for outputs (outputs and deaths wake it at once).
_DP_STEP_WAIT_MS = 20

# Counters summed over the data-parallel ranks (the gauges are recomputed from them).
_SUMMED = ("num_running", "num_waiting", "num_total_blocks", "num_free_blocks",
           "prefix_cache_queries", "prefix_cache_hits", "num_preemptions")


def dp_hints(config, platform) -> list[dict[str, Any]]:
    """What each data-parallel rank's child claims of the host at start-up.

    On a platform with devices, rank i gets devices [i*world, (i+1)*world) of
    those visible here (world = tensor x pipeline parallel size), selected in
    the child by the platform's visible-devices variable before it initialises
    the device. On cpu every rank gets its own block of the cores and 1/K of
    the host memory to size its KV cache from.
    """
    pc = config.parallel_config
    size = pc.data_parallel_size
    world = max(1, pc.tensor_parallel_size) * max(1, pc.pipeline_parallel_size)
    runtime = platform.runtime
    on_cpu = getattr(runtime, "device_type", "cpu") == "cpu"
    # The variable a process selects the platform's devices with (SDK attribute).
    env_var = getattr(platform, "device_control_env_var", None)
    visible: list[str] = []
    if not on_cpu and env_var:
        listed = os.environ.get(env_var)
        visible = ([d.strip() for d in listed.split(",") if d.strip()] if listed
                   else [str(i) for i in range(runtime.device_count())])
        if len(visible) < size * world:
            logger.warning("data_parallel_size %d x world %d needs %d devices but %s lists %d; "
                           "the ranks share devices", size, world, size * world, env_var,
                           len(visible))
            visible = []
    elif not on_cpu:
        logger.warning("platform %s names no visible-devices variable; the %d data-parallel "
                       "ranks share its devices", platform.name, size)
    hints = []
    for rank in range(size):
        hint: dict[str, Any] = {"rank": rank, "size": size, "env": {}, "cpu_share": on_cpu,
                                "memory_share": size if on_cpu or not visible else 1}
        if visible:
            hint["env"][env_var] = ",".join(visible[rank * world:(rank + 1) * world])
        hints.append(hint)
    return hints


class DPClient(EngineCoreClient):
    """K engine cores (data parallel), each an `MPClient` with its own child process.

    Every core is an independent engine (scheduler, KV cache, ranks of its own).
    The requests of one `add_requests` call (the sequences of one user request)
    go to the core with the fewest unfinished requests, counted here from adds,
    finishes and finished outputs (no round trip; ties: the lowest rank), and
    stay there; finishes go to the core holding the request. `step` gathers
    what every core has sent, waiting on all of them at once, so an idle core
    never holds up a busy one. A dead core makes the whole client dead, naming
    its rank. Not thread-safe, like `MPClient`.
    """

    def __init__(self, config, platform) -> None:
        import zmq

        self.size = config.parallel_config.data_parallel_size
        self.cores: list[MPClient] = []
        try:
            # Start every child first, then wait for all: they load in parallel.
            for hint in dp_hints(config, platform):
                self.cores.append(MPClient(config, dp_hint=hint, wait=False))
            for core in self.cores:
                core.wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.engine_pid = self.cores[0].engine_pid
        self._owner: dict[str, int] = {}
        self._generated = [0] * self.size
        self._deferred_error: Exception | None = None
        self._last_step = StepTiming()
        self._poller = zmq.Poller()
        for core in self.cores:
            self._poller.register(core._output, zmq.POLLIN)
            self._poller.register(core._proc.sentinel, zmq.POLLIN)
        logger.info("data parallel: %d engine cores in processes %s", self.size,
                    self.engine_pids)

    @property
    def engine_pids(self) -> list[int]:
        """The pid of each rank's engine-core process."""
        return [core.engine_pid for core in self.cores]

    def loads(self) -> list[int]:
        """Unfinished requests of each core, as this client counts them."""
        return [len(core._unfinished) for core in self.cores]

    # ----- requests -----

    def add_requests(self, requests: list[Request]) -> None:
        if not requests:
            return
        loads = self.loads()
        rank = loads.index(min(loads))
        self.cores[rank].add_requests(requests)
        for request in requests:
            self._owner[request.request_id] = rank

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        by_rank: dict[int, list[str]] = {}
        for request_id in request_ids:
            rank = self._owner.pop(request_id, None)
            if rank is not None:
                by_rank.setdefault(rank, []).append(request_id)
        for rank, ids in sorted(by_rank.items()):
            self._guarded(rank, self.cores[rank].finish_requests, ids, status)

    def has_unfinished_requests(self) -> bool:
        return any(core.has_unfinished_requests() for core in self.cores)

    def step(self) -> list[EngineCoreOutput]:
        """What every core has sent. While nothing came and some core has unfinished
        requests it waits on all cores at once, but for at most `_DP_STEP_WAIT_MS`: then
        it returns nothing, so that the caller's new requests reach an idle core while
        another one is in a long step."""
        outputs = self._collect()
        if not outputs and self._deferred_error is None and any(
                core._unfinished for core in self.cores):
            if self._poller.poll(_DP_STEP_WAIT_MS):
                outputs = self._collect()
            else:
                self.check_alive()
        if not outputs and self._deferred_error is not None:
            error, self._deferred_error = self._deferred_error, None
            raise error
        return outputs

    def _collect(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        for rank, core in enumerate(self.cores):
            try:
                got = self._guarded(rank, core.step, False)
            except EngineDeadError:
                raise
            except Exception as exc:  # a failed step: that core's requests ended
                if self._deferred_error is None:
                    self._deferred_error = RuntimeError(f"data-parallel rank {rank}: {exc}")
                self._owner = {rid: r for rid, r in self._owner.items()
                               if r != rank or rid in core._unfinished}
                continue
            if got:
                self._last_step = core.last_step
            for out in got:
                self._generated[rank] += len(out.new_token_ids)
                if out.finish_status is not None:
                    self._owner.pop(out.request_id, None)
            outputs += got
        return outputs

    def stats(self) -> dict[str, Any]:
        ranks = []
        for rank, core in enumerate(self.cores):
            snapshot = dict(self._guarded(rank, core.stats))
            snapshot["num_generated_tokens"] = self._generated[rank]
            ranks.append(snapshot)
        total = {key: sum(r[key] for r in ranks) for key in _SUMMED}
        blocks = total["num_total_blocks"]
        total["kv_cache_usage"] = (blocks - total["num_free_blocks"]) / blocks if blocks else 0.0
        total["block_size"] = ranks[0]["block_size"]
        total["spec_decode"] = _sum_spec([r["spec_decode"] for r in ranks])
        total["dp_ranks"] = ranks
        return total

    @property
    def last_step(self) -> StepTiming:
        return self._last_step

    def reset_prefix_cache(self) -> bool:
        # Every core is asked, even after one refused.
        results = [self._guarded(rank, core.reset_prefix_cache)
                   for rank, core in enumerate(self.cores)]
        return all(results)

    # ----- liveness and shutdown -----

    def check_alive(self) -> None:
        for rank, core in enumerate(self.cores):
            self._guarded(rank, core.check_alive)

    def shutdown(self) -> None:
        """Ask every core to leave at once, then stop each (SIGTERM, SIGKILL if need be)."""
        for core in self.cores:
            if not core._closed and core._proc.is_alive():
                core.ask_to_leave()
        for core in self.cores:
            core.shutdown()

    def _guarded(self, rank: int, fn, *args):
        """``fn(*args)`` for core ``rank``; its death names the rank (and K)."""
        try:
            return fn(*args)
        except EngineProcessDiedError:
            raise
        except EngineDeadError as exc:
            raise EngineDeadError(
                f"data-parallel rank {rank} of {self.size}: {exc}") from exc


def _sum_spec(per_rank: list[dict | None]) -> dict | None:
    """The speculative-decoding counters of every rank added up (None when off)."""
    present = [s for s in per_rank if s is not None]
    if not present:
        return None
    total: dict[str, Any] = {}
    for key, value in present[0].items():
        if isinstance(value, list):
            width = max(len(s[key]) for s in present)
            total[key] = [sum(s[key][i] for s in present if i < len(s[key]))
                          for i in range(width)]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = sum(s[key] for s in present)
        else:
            total[key] = value
    return total


