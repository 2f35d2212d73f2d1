"""Collectives for one process group, behind a platform-neutral interface."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Communicator:
    """Collective operations over a process group.

    The default implementation uses torch.distributed with whatever backend the
    group was created with (gloo, nccl, xla...). Platforms with a faster path
    (custom all-reduce, shared memory) subclass and override single methods.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
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
        if self.world_size == 1:
            return tensor
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src,
                       group=self.group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Point-to-point send to group-local rank ``dst``."""
        dist.send(tensor, dst=dist.get_global_rank(self.group, dst) if self.group else dst,
                  group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` from group-local rank ``src``."""
        dist.recv(tensor, src=dist.get_global_rank(self.group, src) if self.group else src,
                  group=self.group)
        return tensor
