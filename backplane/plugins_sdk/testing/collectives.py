"""The two-process half of the communicator conformance tests.

`run_collectives` spawns ``world_size`` processes (torch.multiprocessing,
spawn start method) joined in a torch.distributed group; each loads the
platform under test, asks it for a Communicator and runs every collective on
inputs that depend on its rank. Results (or the error each op raised) are
saved per rank and compared with `expected_results` by the tests.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta
from typing import Any

import torch

OPS = ("all_reduce", "all_gather", "all_gather_dim1", "reduce_scatter", "broadcast", "send_recv",
       "isend_recv")


def rank_input(rank: int, rows: int = 4, cols: int = 6) -> torch.Tensor:
    """The rank's deterministic input tensor (float32, distinct per rank)."""
    return torch.arange(rows * cols, dtype=torch.float32).view(rows, cols) * (rank + 1) + rank


def expected_results(world_size: int) -> dict[str, list[torch.Tensor]]:
    """What every rank must hold after each op (index = rank)."""
    inputs = [rank_input(r) for r in range(world_size)]
    total = sum(inputs)
    chunks = total.chunk(world_size, dim=0)
    return {
        "all_reduce": [total] * world_size,
        "all_gather": [torch.cat(inputs, dim=0)] * world_size,
        "all_gather_dim1": [torch.cat(inputs, dim=1)] * world_size,
        "reduce_scatter": [chunks[r] for r in range(world_size)],
        "broadcast": [inputs[world_size - 1]] * world_size,
        # rank r receives from r - 1 (ring); rank 0 from the last rank
        "send_recv": [inputs[(r - 1) % world_size] for r in range(world_size)],
        "isend_recv": [inputs[(r - 1) % world_size] for r in range(world_size)],
    }


def _run_ops(comm: Any, rank: int, world_size: int, device: torch.device) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def record(op: str, fn) -> None:
        try:
            results[op] = fn().detach().to("cpu").clone()
        except Exception:  # reported per op, so one broken op does not hide the others
            results[op] = traceback.format_exc()

    def fresh() -> torch.Tensor:
        return rank_input(rank).to(device)

    record("all_reduce", lambda: comm.all_reduce(fresh()))
    record("all_gather", lambda: comm.all_gather(fresh(), dim=0))
    record("all_gather_dim1", lambda: comm.all_gather(fresh(), dim=1))
    record("reduce_scatter", lambda: comm.reduce_scatter(fresh(), dim=0))
    record("broadcast", lambda: comm.broadcast(fresh(), src=world_size - 1))

    def send_recv() -> torch.Tensor:
        out = torch.empty_like(fresh())
        dst, src = (rank + 1) % world_size, (rank - 1) % world_size
        # Even ranks send first, odd ranks receive first: no deadlock with blocking p2p.
        if rank % 2 == 0:
            comm.send(fresh(), dst)
            return comm.recv(out, src)
        received = comm.recv(out, src)
        comm.send(fresh(), dst)
        return received

    record("send_recv", send_recv)

    def isend_recv() -> torch.Tensor:
        # Every rank sends before it receives: only a non-blocking send lets the ring
        # go round (what a pipeline with batches in flight relies on).
        out = torch.empty_like(fresh())
        sent = fresh()
        work = comm.isend(sent, (rank + 1) % world_size)
        received = comm.recv(out, (rank - 1) % world_size)
        work.wait()
        return received

    record("isend_recv", isend_recv)
    return results


def _worker(rank: int, world_size: int, init_file: str, platform_spec: str, backend: str,
            result_dir: str) -> None:
    import torch.distributed as dist

    from backplane.plugins_sdk.testing.loading import load_platform

    out_path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        platform = load_platform(platform_spec)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        device = torch.device("cpu") if backend == "gloo" else platform.runtime.device(rank)
        comm = platform.make_communicator(None)
        setup = {"rank": comm.rank, "world_size": comm.world_size}
        results = _run_ops(comm, rank, world_size, device)
        dist.barrier()
        dist.destroy_process_group()
        torch.save({"setup": setup, "results": results}, out_path)
    except Exception:
        torch.save({"setup": None, "error": traceback.format_exc()}, out_path)


def run_collectives(platform_spec: str, backend: str = "gloo",
                    world_size: int = 2) -> list[dict[str, Any]]:
    """Spawn the group, run every op, return each rank's saved dict (index = rank)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="backplane-conformance-") as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world_size, init_file, platform_spec, backend, tmp),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
