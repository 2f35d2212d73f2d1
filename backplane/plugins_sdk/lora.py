"""Batched multi-LoRA: the operation platforms provide (``Platform.add_lora``) (SDK 1.1).

One step of a multi-LoRA server mixes requests that use different adapters
(and requests that use none). The adapters' weights live in ``L`` slots
stacked per layer; the engine builds one `LoRAMapping` per step (which slot
each token uses) and every LoRA-wrapped layer adds its low-rank delta with
one call.

Contract (what every implementation computes)::

    add_lora(out, x, lora_a, lora_b, mapping, output_slices=None) -> out

* ``out``: ``[n, O]`` the base layer's output, updated in place and returned.
* ``x``: ``[n, I]`` the layer's input.
* ``lora_a``: ``[L, R, I]`` each slot's A (rank rows, input columns).
* ``lora_b``: ``[L, O, R]`` each slot's B, with the adapter's scaling
  (``alpha / r``) already folded in. A slot whose adapter has a smaller rank
  is zero-padded to ``R``.
* ``mapping.token_slots``: ``[n]`` int32, the slot of each token, ``-1`` for
  the base model only (``out`` row left untouched).

and, for every token ``t`` with ``s = token_slots[t] >= 0``::

    out[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T

computed in ``x``'s dtype (the rank-``R`` intermediate is rounded to it).

``output_slices`` (fused layers: q|k|v, gate|up) gives the sizes of the ``P``
parts the output columns are the concatenation of (they sum to ``O``); the
rank dimension is then split into ``P`` equal parts (``R % P == 0``) and part
``p`` uses ranks ``[p*R/P, (p+1)*R/P)`` for its own output columns only::

    out[t, off_p:off_p + size_p] += (x[t] @ lora_a[s, ranks_p].T) @ lora_b[s, off_p:off_p + size_p, ranks_p].T

The caller guarantees that B is zero outside those blocks (the core writes
the slots so), so an implementation may either skip the zero blocks (one
expand per part, fewer FLOPs) or multiply through them (one expand, fewer
calls): both give the same result.

An implementation must not change its inputs other than ``out``.
`add_lora_torch` is the SDK's portable default (any torch device): a Python
loop over the slots active this step (at most ``L``, never over requests or
tokens), each running one shrink and one expand matmul. When each slot's
tokens are one run of rows (``mapping.slot_ranges``; the core's runner orders
its batch so) it works on row views and adds with ``addmm_``; otherwise it
gathers the slot's tokens and adds back with ``index_add_``. A platform
overrides `Platform.add_lora` with kernels that read ``mapping.token_slots``
only (no host look-up of device values), which also suits graph capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class LoRAMapping:
    """Which adapter slot each token of a step uses (built once per step, shared by all layers).

    Attributes:
        token_slots: ``[n]`` int32 on the device; ``-1`` = base model only.
        active_slots: the distinct slots ``>= 0`` present this step, ascending (host list).
        slot_token_indices: per active slot, the int64 indices of its tokens
            (ascending, on ``token_slots``' device).
        slot_ranges: per active slot ``(start, end)`` when each slot's tokens are
            one contiguous run (the runner orders its batch so that they are);
            None otherwise. Lets an op work on row slices instead of gathering.
    """

    token_slots: torch.Tensor
    active_slots: list[int]
    slot_token_indices: list[torch.Tensor]
    slot_ranges: list[tuple[int, int]] | None = None

    @classmethod
    def build(cls, token_slots: torch.Tensor | Sequence[int],
              device: torch.device | str | None = None) -> LoRAMapping:
        """The mapping for ``token_slots`` (a host or device tensor, or a list of ints).

        ``device`` defaults to ``token_slots``' own device (the host for a list).
        One host pass: a device tensor is read back once; the per-slot indices
        reach the device as one tensor (one copy) of which each slot gets a view.
        """
        if not isinstance(token_slots, torch.Tensor):
            token_slots = torch.tensor(list(token_slots), dtype=torch.int32)
        if token_slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}")
        if token_slots.dtype.is_floating_point or token_slots.dtype == torch.bool:
            raise ValueError(f"token_slots must be an integer tensor, got {token_slots.dtype}")
        device = torch.device(device) if device is not None else token_slots.device
        host = token_slots.to("cpu", torch.int64)
        if bool((host < -1).any()):
            raise ValueError("token_slots holds values below -1 (use -1 for the base model)")
        device_slots = token_slots.to(device, torch.int32, non_blocking=True)
        order = torch.argsort(host, stable=True)
        slots_sorted, counts = torch.unique_consecutive(host[order], return_counts=True)
        keep = slots_sorted >= 0
        if not bool(keep.any()):
            return cls(device_slots, [], [])
        skip = int(counts[~keep].sum())  # the -1 tokens sort first
        host_indices = order[skip:]
        sizes = counts[keep].tolist()
        ends = torch.tensor(sizes).cumsum(0)
        firsts = host_indices[ends - torch.tensor(sizes)]
        lasts = host_indices[ends - 1]
        ranges = None
        if bool((lasts - firsts + 1 == torch.tensor(sizes)).all()):
            ranges = [(int(a), int(b) + 1) for a, b in zip(firsts.tolist(), lasts.tolist(),
                                                           strict=True)]
        indices = host_indices.to(device, non_blocking=True)
        return cls(
            token_slots=device_slots,
            active_slots=[int(s) for s in slots_sorted[keep].tolist()],
            slot_token_indices=list(torch.split(indices, sizes)),
            slot_ranges=ranges,
        )

    @property
    def num_tokens(self) -> int:
        return self.token_slots.numel()


def check_lora_shapes(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, num_tokens: int,
                      output_slices: Sequence[int] | None) -> tuple[int, ...]:
    """Validate the contract's shapes; returns the output slices (``(O,)`` when None)."""
    if x.dim() != 2 or out.dim() != 2:
        raise ValueError(f"add_lora wants 2-D x and out, got {tuple(x.shape)} and "
                         f"{tuple(out.shape)}")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"add_lora wants lora_a [L, R, I] and lora_b [L, O, R], got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    n, in_features = x.shape
    num_slots, rank, a_in = lora_a.shape
    b_slots, out_features, b_rank = lora_b.shape
    if out.shape[0] != n or num_tokens != n:
        raise ValueError(f"x has {n} rows, out {out.shape[0]}, token_slots {num_tokens}")
    if a_in != in_features or out.shape[1] != out_features or (b_slots, b_rank) != (
            num_slots, rank):
        raise ValueError(
            f"shapes do not agree: x {tuple(x.shape)}, out {tuple(out.shape)}, lora_a "
            f"{tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    slices = tuple(int(s) for s in output_slices) if output_slices else (out_features,)
    if sum(slices) != out_features or any(s <= 0 for s in slices):
        raise ValueError(f"output_slices {slices} do not partition {out_features} columns")
    if rank % len(slices):
        raise ValueError(f"rank {rank} does not split into {len(slices)} equal parts")
    return slices


def add_lora_torch(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, mapping: LoRAMapping,
                   output_slices: tuple[int, ...] | None = None) -> torch.Tensor:
    """``out[n, O] +=`` each token's LoRA delta, in place; returns ``out`` (see the module doc).

    Per token ``t`` with slot ``s = token_slots[t] >= 0``:
    ``(x[t] @ lora_a[s].T) @ lora_b[s].T``, where ``lora_a`` is ``[L, R, I]``
    and ``lora_b`` ``[L, O, R]`` with the scaling folded in. With
    ``output_slices`` the output is ``len(output_slices)`` parts of those sizes
    and part ``p`` uses ranks ``[p*R/P, (p+1)*R/P)`` for its own columns only.
    Computes in ``x``'s dtype; loops over ``mapping.active_slots`` only. B is
    zero outside each part's (rows, ranks) block (the contract), so one expand
    over all ranks gives every part at once: on a CPU these products are so
    small that the number of calls, not their FLOPs, sets the cost.
    """
    slices = check_lora_shapes(out, x, lora_a, lora_b, mapping.num_tokens, output_slices)
    if not mapping.active_slots:
        return out
    if mapping.active_slots[-1] >= lora_a.shape[0]:
        raise ValueError(f"slot {mapping.active_slots[-1]} is out of range for "
                         f"{lora_a.shape[0]} LoRA slots")
    del slices  # checked; B's zero off-part blocks make one expand cover every part
    if mapping.slot_ranges is not None:
        _add_lora_ranges(out, x, lora_a, lora_b, mapping)
        return out
    for slot, rows in zip(mapping.active_slots, mapping.slot_token_indices, strict=True):
        a = lora_a[slot].to(x.dtype)  # [R, I]
        b = lora_b[slot].to(x.dtype)  # [O, R], zero outside each part's block
        shrunk = x.index_select(0, rows) @ a.T  # [m, R]
        out.index_add_(0, rows, (shrunk @ b.T).to(out.dtype))
    return out


def _add_lora_ranges(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, mapping: LoRAMapping) -> None:
    """`add_lora_torch` when each slot's tokens are one run of rows: row views in,
    ``addmm_`` straight into ``out``'s rows, no gather or scatter."""
    for slot, (start, end) in zip(mapping.active_slots, mapping.slot_ranges, strict=True):
        a = lora_a[slot].to(x.dtype)  # [R, I]
        b = lora_b[slot].to(x.dtype)  # [O, R]
        shrunk = x[start:end] @ a.T  # [m, R]
        if out.dtype == x.dtype:
            out[start:end].addmm_(shrunk, b.T)
        else:
            out[start:end] += (shrunk @ b.T).to(out.dtype)
