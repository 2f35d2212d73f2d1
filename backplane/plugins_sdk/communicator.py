"""Collectives for one process group, behind a platform-neutral interface."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Communicator:
    """Collective operations over a process group.

    The default implementation uses torch.distributed with whatever backend the
    group was created with (gloo, nccl, xla...). Platforms with a faster path
    (custom all-reduce, shared memory) subclass and override single methods.

    Without a group (``group=None``) and without an initialised default process
    group, as in a single-process engine, the communicator is rank 0 of a world
    of size 1 and never calls torch.distributed: every collective returns its
    input (each rank's contribution is the whole result), ``broadcast`` from
    rank 0 is a no-op, and ``send``/``recv`` raise because there is no peer.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        if group is None and not (dist.is_available() and dist.is_initialized()):
            self.rank, self.world_size = 0, 1
        else:
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` across ranks; returns the reduced tensor (in place when possible)."""
        if self.world_size == 1:
            return tensor
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim``."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum across ranks, then give each rank its ``1/world_size`` slice along ``dim``."""
        if self.world_size == 1:
            return tensor
        if tensor.shape[dim] % self.world_size:
            raise ValueError(
                f"reduce_scatter: size {tensor.shape[dim]} of dim {dim} is not divisible "
                f"by world_size {self.world_size}"
            )
        reduced = self.all_reduce(tensor.clone())
        return reduced.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy ``tensor`` from rank ``src`` (group-local) to every rank."""
        self._check_peer("broadcast", "src", src, allow_self=True)
        if self.world_size == 1:
            return tensor
        dist.broadcast(tensor, src=self._global_rank(src), group=self.group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Point-to-point send to group-local rank ``dst``."""
        self._check_peer("send", "dst", dst)
        dist.send(tensor, dst=self._global_rank(dst), group=self.group)

    def isend(self, tensor: torch.Tensor, dst: int):
        """Start sending ``tensor`` to group-local rank ``dst`` and return at once (SDK 1.1).

        Returns a handle with ``wait()`` and ``is_completed()`` (torch.distributed's
        ``Work``); ``tensor`` must stay unchanged until the handle completes. Pipeline
        parallelism keeps several batches in flight with it: a stage that blocked in
        ``send`` until the next stage posts its ``recv`` would deadlock the ring.
        """
        self._check_peer("isend", "dst", dst)
        return dist.isend(tensor, dst=self._global_rank(dst), group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` from group-local rank ``src``."""
        self._check_peer("recv", "src", src)
        dist.recv(tensor, src=self._global_rank(src), group=self.group)
        return tensor

    def _global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group else group_rank

    def _check_peer(self, op: str, field: str, rank: int, allow_self: bool = False) -> None:
        """Refuse a peer rank outside the group (or this rank itself, for point-to-point)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(
                f"{op}: {field} {rank} is not a rank of the group: ranks are 0..{self.world_size - 1}"
                f" (world_size {self.world_size})"
            )
        if not allow_self and rank == self.rank:
            raise ValueError(
                f"{op}: {field} {rank} is this process's own rank; point-to-point needs another "
                f"rank (world_size {self.world_size})"
            )
