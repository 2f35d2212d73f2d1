"""The fused mixture-of-experts operation platforms provide (``Platform.fused_moe``).

Contract (what every implementation computes)::

    fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation="silu") -> out

* ``hidden``: ``[n, H]`` token activations (any float dtype).
* ``w13``: ``[E, 2I, H]`` each expert's gate projection (rows ``:I``) stacked
  on its up projection (rows ``I:``), in ``hidden``'s dtype.
* ``w2``: ``[E, H, I]`` each expert's down projection.
* ``topk_weights``: ``[n, k]`` routing weights (float32 or ``hidden``'s dtype),
  already softmaxed / renormalised by the model.
* ``topk_ids``: ``[n, k]`` integer expert ids in ``[0, E)``.
* ``activation``: ``"silu"`` (the gated SwiGLU of Mixtral and Qwen MoE).

and returns ``[n, H]`` in ``hidden``'s dtype::

    out[t] = sum_j topk_weights[t, j] * w2[e] @ (act(w13[e, :I] @ x) * (w13[e, I:] @ x)),
             e = topk_ids[t, j], x = hidden[t]

An implementation must not change its inputs. `fused_moe_torch` is the SDK's
portable default (any torch device): it sorts the (token, expert) pairs by
expert and runs two matmuls per expert over that expert's contiguous slice of
rows, so the Python loop is over experts that received tokens, never over
tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MOE_ACTIVATIONS = ("silu",)


def check_moe_activation(activation: str) -> None:
    """Raise ValueError for an activation outside `MOE_ACTIVATIONS`."""
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(
            f"fused_moe activation {activation!r} is not supported; supported: "
            f"{list(MOE_ACTIVATIONS)}"
        )


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The grouped, vectorised default implementation of the fused-MoE contract.

    Steps: flatten the ``n * k`` (token, slot) pairs, sort them by expert
    (stable, so the order inside a group is deterministic), gather the tokens'
    rows once into expert order, and for each expert that received tokens run
    ``gate_up = x @ w13[e].T``, the gated activation and ``x @ w2[e].T`` on its
    contiguous slice. The rows are scaled by their routing weight (in float32)
    and summed back per token with one ``index_add_``. One host sync per call
    (the per-expert counts).
    """
    check_moe_activation(activation)
    n, hidden_size = hidden.shape
    if n == 0:
        return hidden.new_zeros(0, hidden_size)
    k = topk_ids.shape[1]
    num_experts = w13.shape[0]
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat_ids, stable=True)  # positions into the flat (token, slot) list
    token_of = order // k
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    x = hidden.index_select(0, token_of)  # [n*k, H] in expert order
    rows = torch.empty(n * k, hidden_size, dtype=hidden.dtype, device=hidden.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate_up = F.linear(x[start:end], w13[expert])
        act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
        rows[start:end] = F.linear(act, w2[expert])
        start = end
    weights = topk_weights.reshape(-1).index_select(0, order).to(torch.float32)
    out = torch.zeros(n, hidden_size, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, token_of, rows.float() * weights[:, None])
    return out.to(hidden.dtype)
