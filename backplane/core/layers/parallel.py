"""Tensor-parallel splitting of linear layers: which slice of each checkpoint tensor a rank holds.

Layers stay plain ``nn.Linear`` / `MergedLinear` of the per-rank size, so a
platform's ``prepare_model`` can still swap them for its own kernels; the
split is recorded on the module as ``checkpoint_shards`` (read by the loader,
which then reads only that slice from the file), and the one collective a
row-parallel layer needs is issued by the model after the layer.

- Column-parallel (q/k/v, gate/up): each rank holds a block of output rows.
- Row-parallel (o_proj, down_proj): each rank holds a block of input columns;
  the partial outputs are summed across ranks. The bias is added once: rank 0
  loads it, the other ranks hold zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Shard:
    """The slice of a checkpoint tensor a rank loads.

    Attributes:
        dim: the dimension that is split.
        start, length: the slice along ``dim`` in the checkpoint tensor. The
            parameter may be longer (vocabulary padding): the rest is zeroed.
        zero: the rank holds zeros instead (a row-parallel bias on ranks > 0).
    """

    dim: int
    start: int
    length: int
    zero: bool = False


def even_split(total: int, parts: int, index: int, what: str) -> Shard:
    """Rows ``[index * total / parts, ...)`` of ``total``, which ``parts`` must divide."""
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    size = total // parts
    return Shard(0, index * size, size)


def shard_column_parallel(module: nn.Linear, shards: dict[str | None, Shard]) -> None:
    """Mark ``module`` as holding output rows: ``shards`` maps each fused part (None: the
    whole layer) to its rows in the checkpoint tensor of that part."""
    module.checkpoint_shards = {}
    for part, rows in shards.items():
        module.checkpoint_shards[("weight", part)] = rows
        if module.bias is not None:
            module.checkpoint_shards[("bias", part)] = rows


def shard_row_parallel(module: nn.Linear, columns: Shard, rank: int) -> None:
    """Mark ``module`` as holding input columns ``columns``; its bias lives on rank 0."""
    module.checkpoint_shards = {("weight", None): Shard(1, columns.start, columns.length)}
    if module.bias is not None:
        module.checkpoint_shards[("bias", None)] = Shard(0, 0, module.out_features,
                                                         zero=rank != 0)
