"""Which ranks a process works with, and the platform communicators that join them.

A world of ``tensor_parallel_size x pipeline_parallel_size`` ranks is laid out
stage-major, as vLLM does: global rank ``r`` is tensor-parallel rank
``r % tp`` of pipeline stage ``r // tp``. Every collective the model and the
runner issue goes through a `GroupCoordinator`, whose communicator comes from
``platform.make_communicator(group)``: gloo on cpu, nccl on cuda/rocm, or a
plugin's own.

Until `init_model_parallel` runs (a single-process engine), every group is
this process alone and each collective returns its input, so model code calls
them unconditionally at no cost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from backplane.plugins_sdk import Communicator

logger = logging.getLogger(__name__)


@dataclass
class GroupCoordinator:
    """One process group: this process's rank in it, its size and its communicator.

    Attributes:
        ranks: the global ranks of the group, in group-rank order.
        rank: this process's rank within the group.
        communicator: the platform's collectives over the group (None when the
            group is this process alone).
    """

    ranks: list[int] = field(default_factory=lambda: [0])
    rank: int = 0
    communicator: Communicator | None = None
    # Wall time spent in this group's collectives (a diagnostic for benchmarks).
    seconds: float = 0.0
    # Non-blocking sends not known to be complete, with their tensors (which must
    # stay alive and unchanged until then).
    pending_sends: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group (the input itself when the group is one rank)."""
        if self.size == 1:
            return tensor
        start = time.perf_counter()
        out = self.communicator.all_reduce(tensor)
        self.seconds += time.perf_counter() - start
        return out

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim``, in group-rank order."""
        if self.size == 1:
            return tensor
        start = time.perf_counter()
        out = self.communicator.all_gather(tensor, dim=dim % tensor.dim())
        self.seconds += time.perf_counter() - start
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size == 1:
            return tensor
        start = time.perf_counter()
        out = self.communicator.broadcast(tensor, src=src)
        self.seconds += time.perf_counter() - start
        return out

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        start = time.perf_counter()
        self.communicator.send(tensor, dst)
        self.seconds += time.perf_counter() - start

    def isend(self, tensor: torch.Tensor, dst: int) -> None:
        """Send without waiting for the receiver; the tensor is kept until the send is done."""
        start = time.perf_counter()
        work = self.communicator.isend(tensor, dst)
        self.pending_sends = [(w, t) for w, t in self.pending_sends if not w.is_completed()]
        self.pending_sends.append((work, tensor))
        self.seconds += time.perf_counter() - start

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        start = time.perf_counter()
        out = self.communicator.recv(tensor, src)
        self.seconds += time.perf_counter() - start
        return out


@dataclass
class ParallelState:
    """The groups of this process: the whole world, its tensor- and pipeline-parallel groups."""

    world: GroupCoordinator = field(default_factory=GroupCoordinator)
    tp: GroupCoordinator = field(default_factory=GroupCoordinator)
    pp: GroupCoordinator = field(default_factory=GroupCoordinator)
    # This process among the ranks on its host (device index, core share).
    local_rank: int = 0
    local_world_size: int = 1


_STATE = ParallelState()


def get_world_group() -> GroupCoordinator:
    return _STATE.world


def get_tp_group() -> GroupCoordinator:
    return _STATE.tp


def get_pp_group() -> GroupCoordinator:
    return _STATE.pp


def get_parallel_state() -> ParallelState:
    return _STATE


def model_parallel_initialized() -> bool:
    return _STATE.world.size > 1


def rank_layout(rank: int, tensor_parallel_size: int) -> tuple[int, int]:
    """``(pipeline stage, tensor-parallel rank)`` of global ``rank``."""
    return divmod(rank, tensor_parallel_size)


def init_model_parallel(
    platform,
    *,
    rank: int,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    init_method: str | None = None,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    timeout_s: float = 600.0,
) -> ParallelState:
    """Join the world and build this process's groups and communicators.

    Every rank calls this with the same sizes. ``init_method`` None reads the
    torch.distributed environment variables (``torchrun``: MASTER_ADDR, ...).
    The process group uses the platform's ``dist_backend``. ``local_rank`` /
    ``local_world_size`` default to torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE, else
    to the global rank and world size (every rank on this host).
    """
    global _STATE
    world_size = tensor_parallel_size * pipeline_parallel_size
    if not dist.is_initialized():
        dist.init_process_group(
            backend=platform.dist_backend, init_method=init_method or "env://",
            rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    elif dist.get_world_size() != world_size:
        raise ValueError(
            f"torch.distributed is already initialised with world size {dist.get_world_size()}, "
            f"but tensor_parallel_size ({tensor_parallel_size}) x pipeline_parallel_size "
            f"({pipeline_parallel_size}) = {world_size}")
    rank = dist.get_rank()
    stage, tp_rank = rank_layout(rank, tensor_parallel_size)
    # Every rank creates every group, in the same order (torch.distributed requires it).
    tp_groups = [list(range(s * tensor_parallel_size, (s + 1) * tensor_parallel_size))
                 for s in range(pipeline_parallel_size)]
    pp_groups = [list(range(t, world_size, tensor_parallel_size))
                 for t in range(tensor_parallel_size)]

    def coordinator(all_ranks: list[list[int]]) -> GroupCoordinator:
        mine = None
        for ranks in all_ranks:
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine = (ranks, group)
        ranks, group = mine
        comm = platform.make_communicator(group) if group is not None else None
        return GroupCoordinator(ranks=ranks, rank=ranks.index(rank), communicator=comm)

    world = GroupCoordinator(ranks=list(range(world_size)), rank=rank,
                             communicator=platform.make_communicator(dist.group.WORLD))
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    _STATE = ParallelState(world=world, tp=coordinator(tp_groups), pp=coordinator(pp_groups),
                           local_rank=local_rank, local_world_size=local_world_size)
    logger.info("rank %d of %d: pipeline stage %d, tensor-parallel rank %d (%s)", rank,
                world_size, stage, tp_rank, type(world.communicator).__name__)
    return _STATE


@contextlib.contextmanager
def single_rank_state():
    """Build a one-rank engine as if no world existed, even when a split engine of this
    process still holds one: models and runners read the groups once, when built."""
    global _STATE
    saved, _STATE = _STATE, ParallelState()
    try:
        yield
    finally:
        _STATE = saved


def close_communicators() -> None:
    """Release what the platform communicators hold (shared memory), e.g. before a
    worker exits at once; the groups stay as they are."""
    for coordinator in (_STATE.tp, _STATE.pp, _STATE.world):
        close = getattr(coordinator.communicator, "close", None)
        if close is not None:
            close()


def destroy_model_parallel() -> None:
    """Leave the world (idempotent); the groups become this process alone again."""
    global _STATE
    close_communicators()
    _STATE = ParallelState()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
