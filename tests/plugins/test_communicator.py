"""Communicator at world size 1 without torch.distributed: rank 0, every collective an identity.

A single-process engine never calls ``init_process_group``; the SDK's base
Communicator and the cpu platform's (``CpuPlatform.make_communicator``) must
still construct and run every collective, without touching torch.distributed.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from backplane.plugins_sdk import Communicator


def _cpu_platform_communicator() -> Communicator:
    from backplane.platforms.cpu import descriptor

    return descriptor.load().make_communicator()


@pytest.fixture(params=["sdk_base", "cpu_platform"])
def comm(request, monkeypatch):
    assert not dist.is_initialized(), "these tests need a process without a process group"

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was called at world size 1")

    made = Communicator(None) if request.param == "sdk_base" else _cpu_platform_communicator()
    for name in ("all_reduce", "all_gather", "broadcast", "send", "recv", "get_rank",
                 "get_world_size", "get_global_rank"):
        monkeypatch.setattr(dist, name, forbidden)
    return made


def _sample() -> torch.Tensor:
    return torch.arange(12, dtype=torch.float32).reshape(4, 3)


def test_single_process_rank_and_size(comm):
    assert isinstance(comm, Communicator)
    assert (comm.rank, comm.world_size, comm.group) == (0, 1, None)


def test_all_reduce_is_identity_in_place(comm):
    tensor = _sample()
    assert comm.all_reduce(tensor) is tensor
    assert torch.equal(tensor, _sample())


@pytest.mark.parametrize("dim", [0, 1])
def test_all_gather_returns_the_only_part(comm, dim):
    assert torch.equal(comm.all_gather(_sample(), dim=dim), _sample())


@pytest.mark.parametrize("dim", [0, 1])
def test_reduce_scatter_returns_the_whole_tensor(comm, dim):
    assert torch.equal(comm.reduce_scatter(_sample(), dim=dim), _sample())


def test_broadcast_from_rank_0_is_identity(comm):
    tensor = _sample()
    assert comm.broadcast(tensor) is tensor and comm.broadcast(tensor, src=0) is tensor
    assert torch.equal(tensor, _sample())


def test_broadcast_from_a_missing_rank_is_refused(comm):
    with pytest.raises(ValueError, match=r"broadcast: src 1 is not a rank of the group: "
                                         r"ranks are 0\.\.0 \(world_size 1\)"):
        comm.broadcast(_sample(), src=1)


@pytest.mark.parametrize(("op", "field"), [("send", "dst"), ("recv", "src")])
@pytest.mark.parametrize("peer", [0, 1])
def test_point_to_point_has_no_peer(comm, op, field, peer):
    with pytest.raises(ValueError, match=rf"{op}: {field} {peer} is "):
        getattr(comm, op)(_sample(), peer)


def test_world_size_comes_from_torch_distributed_once_initialised(tmp_path):
    # The other branch: an initialised one-rank gloo group is asked, not assumed.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        comm = Communicator(None)
        assert (comm.rank, comm.world_size) == (0, 1)
        tensor = _sample()
        assert torch.equal(comm.all_reduce(tensor), _sample())
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
