"""The cpu platform's shared-memory collectives: exact sums, same bits on every rank, gloo
fallback for tensors larger than a slot, and no segment left behind."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backplane.platforms.cpu import communicator as shm_module
from backplane.platforms.cpu.communicator import SharedMemoryCommunicator, shm_supported

pytestmark = pytest.mark.skipif(not shm_supported(), reason="x86 Linux only")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    comm = SharedMemoryCommunicator.for_group(dist.group.WORLD)
    out = {"type": type(comm).__name__, "name": comm.shm.name}
    gen = torch.Generator().manual_seed(rank)
    parts = [torch.randn(5, 7, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    for step in range(3):  # both banks, and a bank reused
        t = parts[rank].clone() * (step + 1)
        comm.all_reduce(t)
        out[f"f32_{step}"] = t
    b = parts[rank].to(torch.bfloat16)
    out["bf16"] = comm.all_reduce(b.clone())
    out["gather"] = comm.all_gather(torch.full((2, 3), float(rank)), dim=1)
    src = torch.arange(4) if rank == 1 else torch.zeros(4, dtype=torch.int64)
    out["bcast"] = comm.broadcast(src, src=1)
    big = torch.full((shm_module.SLOT_BYTES // 4 + 1,), float(rank + 1))  # > one slot: gloo
    out["big"] = float(comm.all_reduce(big)[0])
    out["noise"] = torch.randn(1, generator=gen)
    comm.close()
    results[rank] = out
    dist.destroy_process_group()


def test_shared_memory_collectives_across_three_ranks():
    world = 3
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(world, _free_port(), results), nprocs=world)
        results = dict(results)
    parts = [torch.randn(5, 7, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    for rank in range(world):
        got = results[rank]
        assert got["type"] == "SharedMemoryCommunicator"
        for step in range(3):
            expected = sum(p * (step + 1) for p in parts)
            torch.testing.assert_close(got[f"f32_{step}"], expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(got[f"f32_{step}"], results[0][f"f32_{step}"])  # same bits
        expected_bf16 = sum(p.to(torch.bfloat16).float() for p in parts).to(torch.bfloat16)
        assert torch.equal(got["bf16"], expected_bf16)  # summed in float32, rounded once
        assert torch.equal(got["gather"], torch.cat(
            [torch.full((2, 3), float(r)) for r in range(world)], dim=1))
        assert torch.equal(got["bcast"], torch.arange(4))
        assert got["big"] == sum(range(1, world + 1))
    assert not os.path.exists(os.path.join("/dev/shm", results[0]["name"].lstrip("/")))
