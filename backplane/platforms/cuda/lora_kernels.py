"""Triton multi-LoRA shrink/expand kernels: the cuda and rocm platforms' ``Platform.add_lora``.

The contract is the SDK's (`backplane.plugins_sdk.lora`). The step's tokens
are grouped by adapter slot on the device (`align_by_slot`: a few vectorised
torch ops, no host sync; base-model tokens, slot -1, form one extra group that
is skipped), each group padded to a multiple of ``BLOCK_M``, so every tile of
sorted rows belongs to one slot and its weights are read once per tile. Then:

1. shrink: ``tmp[t, :] = x[t] @ lora_a[slot].T`` for every row of a tile
   (``[n, R]`` in ``x``'s dtype, float32 accumulation), grid
   ``tiles x rank blocks``;
2. expand: ``out[t, part] += tmp[t, ranks_p] @ lora_b[slot, part, ranks_p].T``,
   one launch per output slice (one for an unfused layer), grid
   ``tiles x output-column blocks``; each (token, column) is written by one
   program, so no atomics.

The kernels read only ``token_slots`` and the grid is sized from shapes
(``cdiv(n, BLOCK_M) + L + 1`` tiles), never from device values, so a call is
CUDA-graph capturable. Tiles of the base-model group or past the last group
return at once.

Importing this module imports triton; it runs on CPU tensors only under
``TRITON_INTERPRET=1`` (used by the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from backplane.plugins_sdk.lora import check_lora_shapes


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    tmp_ptr,
    sorted_rows_ptr,
    tile_slots_ptr,
    num_rows,
    num_slots,
    R,
    K,
    stride_xm,
    stride_xk,
    stride_al,
    stride_ar,
    stride_ak,
    stride_tm,
    stride_tr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """tmp[row] = x[row] @ A[slot].T for the rows of one tile (slot == num_slots: skip)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.load(tile_slots_ptr + pid_m).to(tl.int64)
    if slot < num_slots:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_rows_ptr + offs_m).to(tl.int64)
        row_ok = rows < num_rows
        rows = tl.where(row_ok, rows, 0)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        a_base = a_ptr + slot * stride_al
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xs = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if IEEE_DOT:
                acc += tl.dot(xs, a, input_precision="ieee")
            else:
                acc += tl.dot(xs, a)
        tl.store(tmp_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                 acc.to(tmp_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_kernel(
    tmp_ptr,
    b_ptr,
    out_ptr,
    sorted_rows_ptr,
    tile_slots_ptr,
    num_rows,
    num_slots,
    N,
    K,
    stride_tm,
    stride_tk,
    stride_bl,
    stride_bn,
    stride_bk,
    stride_om,
    stride_on,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[row] += tmp[row] @ B[slot].T for the rows of one tile (slot == num_slots: skip).

    The pointers and strides are those of one output slice and its rank block.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tile_slots_ptr + pid_m).to(tl.int64)
    if slot < num_slots:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_rows_ptr + offs_m).to(tl.int64)
        row_ok = rows < num_rows
        rows = tl.where(row_ok, rows, 0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        b_base = b_ptr + slot * stride_bl
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            t = tl.load(tmp_ptr + rows[:, None] * stride_tm + offs_k[None, :] * stride_tk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE_DOT:
                acc += tl.dot(t, b, input_precision="ieee")
            else:
                acc += tl.dot(t, b)
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = row_ok[:, None] & n_ok[None, :]
        # Round the delta to x's dtype first, as the torch default does.
        delta = acc.to(tmp_ptr.dtype.element_ty).to(tl.float32)
        old = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (old + delta).to(out_ptr.dtype.element_ty), mask=mask)


def align_by_slot(token_slots: torch.Tensor, num_slots: int,
                  block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows grouped by slot, each group padded to a multiple of ``block_m``.

    Slot -1 (base model only) is group ``num_slots``. Returns ``(sorted_rows,
    tile_slots)``: ``sorted_rows`` has ``num_tiles * block_m`` int32 entries,
    padding holding ``n``; ``tile_slots[t]`` is tile ``t``'s slot
    (``num_slots`` for the base-model group and for tiles past the last
    group). ``num_tiles = cdiv(n, block_m) + num_slots + 1`` depends on shapes
    only, and nothing is read back to the host (``scatter_add_`` counts,
    unlike ``bincount``, need no host-side maximum).
    """
    device = token_slots.device
    n = token_slots.numel()
    groups = num_slots + 1
    slots = token_slots.to(torch.int64)
    slots = torch.where(slots < 0, torch.full_like(slots, num_slots), slots)
    counts = torch.zeros(groups, dtype=torch.int64, device=device)
    counts.scatter_add_(0, slots, torch.ones_like(slots))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(slots, stable=True)
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - group_start[slots[order]]
    dest = (padded_end - padded)[slots[order]] + rank
    num_tiles = -(-n // block_m) + groups
    sorted_rows = torch.full((num_tiles * block_m,), n, dtype=torch.int32, device=device)
    sorted_rows[dest] = order.to(torch.int32)
    tile_start = torch.arange(num_tiles, device=device) * block_m
    tile_slots = torch.searchsorted(padded_end, tile_start, right=True)
    tile_slots = tile_slots.clamp_(max=num_slots).to(torch.int32)
    return sorted_rows, tile_slots


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    output_slices: Sequence[int] | None = None,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """The add-LoRA contract with one shrink and one expand launch per output slice.

    ``token_slots`` is the mapping's ``[n]`` int32 device tensor; ``out`` is
    updated in place and returned (see the module doc).
    """
    slices = check_lora_shapes(out, x, lora_a, lora_b, token_slots.numel(), output_slices)
    n, in_features = x.shape
    if n == 0:
        return out
    num_slots, rank, _ = lora_a.shape
    if lora_a.dtype != x.dtype:
        lora_a = lora_a.to(x.dtype)
    if lora_b.dtype != x.dtype:
        lora_b = lora_b.to(x.dtype)
    sorted_rows, tile_slots = align_by_slot(token_slots, num_slots, block_m)
    num_tiles = tile_slots.numel()
    ieee = x.dtype == torch.float32
    tmp = torch.empty(n, rank, dtype=x.dtype, device=x.device)
    br, bk = _block(rank, block_n), _block(in_features, block_k)
    _lora_shrink_kernel[(num_tiles, triton.cdiv(rank, br))](
        x, lora_a, tmp, sorted_rows, tile_slots, n, num_slots, rank, in_features,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        tmp.stride(0), tmp.stride(1),
        IEEE_DOT=ieee, BLOCK_M=block_m, BLOCK_R=br, BLOCK_K=bk,
    )
    part_rank = rank // len(slices)
    offset = 0
    for p, size in enumerate(slices):
        tmp_p = tmp[:, p * part_rank:(p + 1) * part_rank]
        b_p = lora_b[:, offset:offset + size, p * part_rank:(p + 1) * part_rank]
        out_p = out[:, offset:offset + size]
        bn, bk = _block(size, block_n), _block(part_rank, block_k)
        _lora_expand_kernel[(num_tiles, triton.cdiv(size, bn))](
            tmp_p, b_p, out_p, sorted_rows, tile_slots, n, num_slots, size, part_rank,
            tmp_p.stride(0), tmp_p.stride(1), b_p.stride(0), b_p.stride(1), b_p.stride(2),
            out_p.stride(0), out_p.stride(1),
            IEEE_DOT=ieee, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
        )
        offset += size
    return out
