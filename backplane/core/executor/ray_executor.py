"""Ranks as Ray actors, on this host or across nodes (``distributed_executor_backend="ray"``).

Rank 0 (the driver) runs in the engine core's process, as with ``mp``; ranks
1..N-1 are Ray actors (`RayRankWorker`), one per bundle of a placement group
that reserves every rank's resources: ``{"CPU": cores per rank}`` on cpu,
``{"GPU": 1}`` on cuda/rocm. Rank 0's bundle is the one on the driver's node
(it holds no actor: it keeps the driver's share reserved); the other ranks
take the remaining bundles, those on the driver's node first, then node by
node, so that consecutive ranks (a tensor-parallel group) share a node where
the placement allows.

Each actor builds its runner with `worker.build_worker_runner` (plugins,
platform, ``init_worker``, the process group over TCP on the driver's address)
and then runs `worker.serve_plans` as one long actor call, fed by a ZMQ PULL
socket connected to a PUSH socket the driver binds on its node's address. The
ObjectRef of that call ends only when the actor stops: a watcher thread waits
on them, so an actor that dies (``ray.kill``, a signal, out of memory, an
exception) makes the current or next step raise `WorkerDiedError` naming the
rank and Ray's reason within about a second.

Ray is joined, in this order: the process's existing connection
(``ray.is_initialized()``); ``RAY_ADDRESS`` (``local`` starts a new cluster);
a cluster running on this host (``address="auto"``); else a local cluster
started with this host's cores, which `shutdown` stops again.

Environment:
    BACKPLANE_RAY_PLACEMENT_STRATEGY: PACK (default), SPREAD, STRICT_PACK or
        STRICT_SPREAD (one rank per node).
    BACKPLANE_RAY_CPUS_PER_RANK: cores each rank's bundle reserves on cpu
        (default: the cluster's available cores / ranks, at least 1); a rank's
        torch thread pool never exceeds it.
    BACKPLANE_RAY_PLACEMENT_TIMEOUT: seconds to wait for the placement group
        (default 120).
    BACKPLANE_WORKER_STARTUP_TIMEOUT: as for ``mp``.
Variables named BACKPLANE_*, HF_*, GLOO_*, NCCL_* and OMP_/MKL_ thread settings
of the engine process are passed on to the actors (other nodes' raylets do not
inherit them).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import torch

from backplane.core.distributed.parallel_state import destroy_model_parallel, init_model_parallel
from backplane.core.executor.base import (
    STARTUP_TIMEOUT_S,
    PlanBroadcastExecutor,
    run_while_watching,
)
from backplane.core.model_runner.runner import ModelRunner

logger = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_FORWARDED_PREFIXES = ("BACKPLANE_", "HF_", "GLOO_", "NCCL_", "TORCH_")
_FORWARDED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HUGGING_FACE_HUB_TOKEN")
# Ray would otherwise narrow each GPU actor to the one device it assigned; the
# platform picks device ``local_rank`` of the node, as with ``mp``.
_NOSET_DEVICES = ("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES",
                  "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES",
                  "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES")
_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _short(exc: BaseException, limit: int = 800) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


class RayRankWorker:
    """The body of one rank's actor: build the runner, then serve plans until told to stop."""

    def __init__(self) -> None:
        self.runner = None
        self._sock = None

    def info(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def build(self, config, rank: int, init_method: str, plan_addr: str, local_rank: int,
              local_world_size: int, cpus: int | None) -> bool:
        import zmq

        from backplane.core.engine.core_proc import restored_config
        from backplane.core.executor.worker import build_worker_runner
        from backplane.logging_utils import configure_logging

        configure_logging()
        if cpus is not None:
            # No more threads than the bundle's cores (init_worker keeps an explicit
            # OMP_NUM_THREADS).
            threads = min(cpus, int(os.environ.get("OMP_NUM_THREADS", cpus)))
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        self._sock = zmq.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(plan_addr)
        self.runner = build_worker_runner(restored_config(config), rank, init_method,
                                          local_rank, local_world_size)
        return True

    def serve(self) -> str:
        """Run every plan the driver sends; returns at shutdown (the ObjectRef's end)."""
        from backplane.core.executor.worker import serve_plans

        try:
            serve_plans(self.runner, self._sock.recv)
        finally:
            self._sock.close()
            destroy_model_parallel()
        return "shutdown"


def _connect_ray() -> bool:
    """Join (or start) Ray; True when this call started the cluster."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    if address is None:
        try:
            ray.init(address="auto", logging_level=logging.WARNING)
            return False
        except ConnectionError:
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ray.init(address="local", num_cpus=cores, include_dashboard=False,
             logging_level=logging.WARNING)
    logger.info("ray executor: started a local Ray cluster (%d cpus)", cores)
    return True


class RayExecutor(PlanBroadcastExecutor):
    """The driver here, the other ranks as Ray actors in a placement group."""

    def __init__(self, config, platform) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as exc:
            raise ImportError("distributed_executor_backend 'ray' needs Ray: "
                              "pip install 'backplane-llm[ray]'") from exc
        import zmq

        from backplane.core.engine.core_proc import picklable_config

        pc = config.parallel_config
        self.world_size = pc.tensor_parallel_size * pc.pipeline_parallel_size
        self._closed = False
        super().__init__()
        self.actors: list = []
        self.actor_info: list[dict] = []  # rank r's actor is actors[r - 1]
        self._serve_refs: list = []
        self.placement_group = None
        self._watcher = None
        self._affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self._threads = torch.get_num_threads()
        self._started_ray = _connect_ray()
        try:
            strategy = os.environ.get("BACKPLANE_RAY_PLACEMENT_STRATEGY", "PACK").upper()
            if strategy not in STRATEGIES:
                raise ValueError(f"BACKPLANE_RAY_PLACEMENT_STRATEGY ({strategy!r}) must be "
                                 f"one of {list(STRATEGIES)}")
            ip = ray.util.get_node_ip_address()
            driver_node = ray.get_runtime_context().get_node_id()
            resource, amount = self._bundle_resource(platform, ray)
            self.cpus_per_rank = int(amount) if resource == "CPU" else None
            bundles = [{resource: amount} for _ in range(self.world_size)]
            # Rank 0 runs in this process: one bundle must be on this node.
            bundles[0][f"node:{ip}"] = 0.001
            self.placement_group = placement_group(bundles, strategy=strategy,
                                                   name=f"backplane-{os.getpid()}-{id(self)}")
            timeout = float(os.environ.get("BACKPLANE_RAY_PLACEMENT_TIMEOUT", "120"))
            ready, _ = ray.wait([self.placement_group.ready()], timeout=timeout)
            if not ready:
                raise RuntimeError(
                    f"the Ray cluster could not place {self.world_size} bundles of "
                    f"{{{resource!r}: {amount}}} ({strategy}) within {timeout:.0f} s "
                    f"(BACKPLANE_RAY_PLACEMENT_TIMEOUT); available: "
                    f"{ray.available_resources()}")
            bundle_nodes = ray.util.placement_group_table(
                self.placement_group)["bundles_to_node_id"]
            order = self._rank_bundles(bundle_nodes, driver_node)
            nodes = [bundle_nodes[b] for b in order]  # node of each rank
            local = [(nodes[:r].count(nodes[r]), nodes.count(nodes[r]))
                     for r in range(self.world_size)]
            self.rank_nodes = nodes

            env = {k: v for k, v in os.environ.items()
                   if k.startswith(_FORWARDED_PREFIXES) or k in _FORWARDED}
            if resource == "GPU":
                env.update({k: "1" for k in _NOSET_DEVICES})
            if self.cpus_per_rank is not None:
                env["OMP_NUM_THREADS"] = str(min(self.cpus_per_rank,
                                                 int(env.get("OMP_NUM_THREADS", 1 << 30))))
            init_method = f"tcp://{ip}:{_free_port(ip)}"
            remote_cls = ray.remote(RayRankWorker)
            shipped = ray.put(picklable_config(config))
            ctx = zmq.Context.instance()
            build_refs = []
            for rank in range(1, self.world_size):
                sock = ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                port = sock.bind_to_random_port(f"tcp://{ip}")
                self.plan_socks.append(sock)
                actor_env = dict(env)
                if resource == "GPU" and nodes[rank] == driver_node:
                    # The driver's node: index the devices the engine process sees, as
                    # the driver does (data parallel gives each engine its own slice).
                    actor_env.update({k: os.environ[k] for k in _DEVICE_VARS
                                      if k in os.environ})
                actor = remote_cls.options(
                    name=None, max_restarts=0, max_concurrency=1,
                    num_cpus=amount if resource == "CPU" else 0,
                    num_gpus=amount if resource == "GPU" else 0,
                    resources=({} if resource in ("CPU", "GPU") else {resource: amount}),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group,
                        placement_group_bundle_index=order[rank]),
                    runtime_env={"env_vars": actor_env},
                ).remote()
                self.actors.append(actor)
                lr, lws = local[rank]
                build_refs.append(actor.build.remote(
                    shipped, rank, init_method, f"tcp://{ip}:{port}", lr, lws,
                    self.cpus_per_rank))
            self._build_refs = build_refs

            platform.init_worker(*local[0])
            if self.cpus_per_rank is not None and "OMP_NUM_THREADS" not in os.environ:
                torch.set_num_threads(min(torch.get_num_threads(), self.cpus_per_rank))
            self._while_watching(lambda: init_model_parallel(
                platform, rank=0, tensor_parallel_size=pc.tensor_parallel_size,
                pipeline_parallel_size=pc.pipeline_parallel_size, init_method=init_method,
                local_rank=local[0][0], local_world_size=local[0][1],
                timeout_s=STARTUP_TIMEOUT_S), "joining the process group")
            self.runner = self._while_watching(lambda: ModelRunner(config, platform),
                                               "loading the model")
            self._while_watching(lambda: None, "loading the model", wait_all=True)
            self.actor_info = ray.get([a.info.remote() for a in self.actors])
            self._serve_refs = [a.serve.remote() for a in self.actors]
        except BaseException:
            self.shutdown()
            raise
        self._watcher = threading.Thread(target=self._watch, name="backplane-ray-watch",
                                         daemon=True)
        self._watcher.start()
        logger.info("ray executor: %d ranks (tensor parallel %d x pipeline parallel %d), "
                    "placement %s, %s per rank, rank nodes %s", self.world_size,
                    pc.tensor_parallel_size, pc.pipeline_parallel_size, strategy,
                    {resource: amount}, [n[:8] for n in nodes])

    # ------------------------------------------------------------ placement
    def _bundle_resource(self, platform, ray) -> tuple[str, float]:
        device = getattr(platform, "device_type", "cpu")
        if device == "cpu":
            explicit = os.environ.get("BACKPLANE_RAY_CPUS_PER_RANK")
            if explicit:
                return "CPU", max(1, int(explicit))
            available = int(ray.available_resources().get("CPU", 0))
            return "CPU", max(1, available // self.world_size)
        # The Ray resource of one of the platform's devices (SDK attribute).
        resource = getattr(platform, "ray_device_resource", None)
        if resource is None:
            raise ValueError(
                f"platform {platform.name!r} names no Ray resource for its devices "
                "(Platform.ray_device_resource); the ray executor cannot place its ranks")
        return resource, 1

    def _rank_bundles(self, bundle_nodes: dict, driver_node: str) -> list[int]:
        """Bundle index of each rank: rank 0 on the driver's node, then node by node."""
        indices = sorted(bundle_nodes)
        on_driver = [b for b in indices if bundle_nodes[b] == driver_node]
        if not on_driver:
            raise RuntimeError(
                f"no bundle of the placement group is on the driver's node ({driver_node}); "
                f"rank 0 runs in this process: start the engine on a node of the cluster")
        rest = [b for b in indices if b != on_driver[0]]
        first_seen = {}
        for b in rest:
            first_seen.setdefault(bundle_nodes[b], b)
        rest.sort(key=lambda b: (bundle_nodes[b] != driver_node, first_seen[bundle_nodes[b]], b))
        return [on_driver[0]] + rest

    # ------------------------------------------------------------ start-up
    def _build_failure(self) -> str | None:
        import ray

        done, _ = ray.wait(self._build_refs, num_returns=len(self._build_refs), timeout=0)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - described to the caller
                rank = self._build_refs.index(ref) + 1
                return f"worker rank {rank} failed: {_short(exc, 4000)}"
        return None

    def _build_failure_within(self, grace_s: float) -> str | None:
        deadline = time.monotonic() + grace_s
        while True:
            failure = self._build_failure()
            if failure is not None or time.monotonic() >= deadline:
                return failure
            time.sleep(0.1)

    def _while_watching(self, fn, what: str, wait_all: bool = False):
        """Run ``fn`` (which waits for the other ranks) while checking that the actors live;
        ``wait_all``: also until every actor finished building."""
        import ray

        def all_built() -> bool:
            done, _ = ray.wait(self._build_refs, num_returns=len(self._build_refs), timeout=0)
            return len(done) == len(self._build_refs)

        return run_while_watching(fn, what, self._build_failure_within,
                                  done=all_built if wait_all else (lambda: True))

    # ------------------------------------------------------------ serving
    def _describe(self, rank: int, exc: BaseException | None) -> str:
        info = self.actor_info[rank - 1] if rank - 1 < len(self.actor_info) else {}
        where = f"worker rank {rank} (Ray actor pid {info.get('pid')}, node {info.get('ip')})"
        if exc is None:
            return f"{where} stopped serving unexpectedly"
        import ray

        if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
            # An exception in the actor: its own type and message (the traceback is logged).
            logger.error("worker rank %d: %s", rank, exc)
            return f"{where} failed: {_short(exc.cause)}"
        # Ray's death reports carry indented "key: value" lines; keep the sentences.
        text = " ".join(line.strip() for line in str(exc).splitlines()
                        if line.strip() and not line.startswith(("\t", " ")))
        return f"{where} died: {type(exc).__name__}: {text[:800]}"

    def _watch(self) -> None:
        """Notice a dying actor at once, even while the driver waits in a collective."""
        import ray

        refs = list(self._serve_refs)
        while not self._closed:
            done, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            if not done:
                continue
            if self._closed:
                return
            rank = refs.index(done[0]) + 1
            try:
                ray.get(done[0])
                reason = None
            except Exception as exc:  # noqa: BLE001 - the failure's description
                reason = exc
            self.failure = self._describe(rank, reason)
            logger.error("%s; the engine stops", self.failure)
            return

    def failure_after(self, grace_s: float) -> str | None:
        deadline = time.monotonic() + grace_s
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.failure

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        import ray

        self.send_shutdown()
        if ray.is_initialized():
            if self._serve_refs:
                ray.wait(self._serve_refs, num_returns=len(self._serve_refs), timeout=2.0)
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            if self.placement_group is not None:
                try:
                    ray.util.remove_placement_group(self.placement_group)
                except Exception:  # noqa: BLE001 - already removed
                    pass
        if self._watcher is not None:
            self._watcher.join(timeout=2)
        for sock in self.plan_socks:
            sock.close()
        destroy_model_parallel()
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity)
        torch.set_num_threads(self._threads)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
