"""Triton fused mixture-of-experts: the cuda and rocm platforms' ``Platform.fused_moe``.

The contract is the SDK's (`backplane.plugins_sdk.fused_moe`). The ``n * k``
(token, slot) pairs are sorted by expert on the device and each expert's group
is padded to a multiple of ``BLOCK_M`` (``align_by_expert``, a few vectorised
torch ops, no host sync), so every ``BLOCK_M`` tile of sorted rows belongs to
one expert. Two launches of one grouped-GEMM kernel then do the work:

1. ``act(x @ w13[e, :I].T) * (x @ w13[e, I:].T)`` for every row of a tile,
   gate and up accumulated side by side in float32, the gated activation
   applied in registers, written to an ``[n * k, I]`` buffer;
2. ``h @ w2[e].T`` scaled by the row's routing weight, written (float32) to
   an ``[n * k, H]`` buffer that is summed over the k slots of each token.

The grid is sized from an upper bound on the padded rows (``n * k`` plus one
partial tile per expert), never from device values, so a launch is
CUDA-graph capturable; tiles past the last group only see masked rows.

Importing this module imports triton; it runs on CPU tensors only under
``TRITON_INTERPRET=1`` (used by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backplane.plugins_sdk.fused_moe import check_moe_activation


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_rows_ptr,
    tile_experts_ptr,
    num_rows,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[row] = epilogue(A[row // A_ROW_DIV] @ B[expert].T) for the rows of one tile.

    With GATED, B holds 2N output rows (gate then up) and the epilogue is
    silu(gate) * up; with MUL_WEIGHT the result is scaled by weights[row].
    Padded tile rows carry ``num_rows`` and are masked out.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_experts_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_rows_ptr + offs_m).to(tl.int64)
    row_ok = rows < num_rows
    a_rows = tl.where(row_ok, rows // A_ROW_DIV, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    b_base = b_ptr + expert * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )
        b_mask = k_ok[:, None] & n_ok[None, :]
        b = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=b_mask, other=0.0)
        if IEEE_DOT:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if GATED:
            b_up = tl.load(b_base + (offs_n[None, :] + N) * stride_bn + offs_k[:, None] * stride_bk,
                           mask=b_mask, other=0.0)
            if IEEE_DOT:
                acc_up += tl.dot(a, b_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, b_up)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(
        c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flat ``[n * k]`` (token, slot) list grouped by expert, padded per expert.

    Returns ``(sorted_rows, tile_experts)``: ``sorted_rows`` has
    ``num_tiles * block_m`` entries, each expert's rows contiguous and its
    group padded to a multiple of ``block_m`` with the value ``n * k``;
    ``tile_experts[t]`` is the expert of tile ``t`` (tiles past the last group
    hold only padding). ``num_tiles = cdiv(n * k, block_m) + num_experts``, an
    upper bound that depends on shapes only.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_rows = flat.numel()
    device = flat.device
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_rows, device=device) - group_start[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank
    num_tiles = -(-num_rows // block_m) + num_experts
    sorted_rows = torch.full((num_tiles * block_m,), num_rows, dtype=torch.int32, device=device)
    sorted_rows[dest] = order.to(torch.int32)
    tile_start = torch.arange(num_tiles, device=device) * block_m
    tile_experts = torch.searchsorted(padded_end, tile_start, right=True)
    tile_experts = tile_experts.clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_rows, tile_experts


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """The fused-MoE contract with two grouped-GEMM Triton launches (see the module doc)."""
    check_moe_activation(activation)
    n, hidden_size = hidden.shape
    if n == 0:
        return hidden.new_zeros(0, hidden_size)
    top_k = topk_ids.shape[1]
    num_experts, inter = w2.shape[0], w2.shape[2]
    num_rows = n * top_k
    sorted_rows, tile_experts = align_by_expert(topk_ids, num_experts, block_m)
    num_tiles = tile_experts.numel()
    ieee = hidden.dtype == torch.float32
    act = torch.empty(num_rows, inter, dtype=hidden.dtype, device=hidden.device)
    bn, bk = _block(inter, block_n), _block(hidden_size, block_k)
    _grouped_gemm_kernel[(num_tiles, triton.cdiv(inter, bn))](
        hidden, w13, act, topk_weights, sorted_rows, tile_experts, num_rows, inter, hidden_size,
        hidden.stride(0), hidden.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        A_ROW_DIV=top_k, GATED=True, MUL_WEIGHT=False, IEEE_DOT=ieee,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
    )
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    rows_out = torch.empty(num_rows, hidden_size, dtype=torch.float32, device=hidden.device)
    bn, bk = _block(hidden_size, block_n), _block(inter, block_k)
    _grouped_gemm_kernel[(num_tiles, triton.cdiv(hidden_size, bn))](
        act, w2, rows_out, weights, sorted_rows, tile_experts, num_rows, hidden_size, inter,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        rows_out.stride(0), rows_out.stride(1),
        A_ROW_DIV=1, GATED=False, MUL_WEIGHT=True, IEEE_DOT=ieee,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
    )
    return rows_out.view(n, top_k, hidden_size).sum(dim=1).to(hidden.dtype)
