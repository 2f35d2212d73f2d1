"""Mixture-of-experts layers: the router's top-k and the experts' fused computation.

The experts' weights are stacked at load time (``w13 [E, 2I, H]``: gate rows
then up rows; ``w2 [E, H, I]``) and computed in one call to the platform's
fused-MoE operation (``Platform.fused_moe``, contract in
`backplane.plugins_sdk.fused_moe`). The core never picks the kernel: the
model runner hands the platform's op to every `FusedMoE` layer
(`bind_fused_moe`); until then the SDK's portable default is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from backplane.plugins_sdk.fused_moe import check_moe_activation, fused_moe_torch

MoeOp = Callable[..., torch.Tensor]


def route_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax`` (float32) over the experts, the ``top_k`` largest, optionally renormalised.

    Returns ``(topk_weights [n, k] float32, topk_ids [n, k] int64)``, as
    transformers' Mixtral and Qwen MoE routers compute them.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """The routed experts of one MoE layer, computed by one fused-MoE call.

    Args:
        num_experts: E.
        hidden_size: H.
        intermediate_size: I, each expert's gate/up width.
        top_k: experts per token.
        renormalize: rescale the top-k weights to sum to one.
        activation: gated activation name (``"silu"``).
        dtype: parameter dtype.
    """

    # Platforms see MoE layers under this name (see Platform.prepare_model).
    layer_kind = "fused_moe"

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        top_k: int,
        renormalize: bool,
        activation: str = "silu",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_moe_activation(activation)
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in 1..num_experts "
                             f"({num_experts})")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation = activation
        self.w13 = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype)
        )
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype))
        # A plain attribute (not a submodule): the platform's op, set by bind_fused_moe.
        self.moe_op: MoeOp = fused_moe_torch

    def expert_view(self, expert: int, shard: str) -> torch.Tensor:
        """Where one checkpoint tensor of ``expert`` goes: shard "gate", "up" or "down"."""
        size = self.intermediate_size
        if shard == "down":
            return self.w2.data[expert]
        start = 0 if shard == "gate" else size
        return self.w13.data[expert, start : start + size]

    # Data-dependent grouping (a host sync per call): eager under torch.compile,
    # like the attention layer.
    @torch.compiler.disable
    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """``hidden [n, H]``, ``router_logits [n, E]`` -> ``[n, H]``."""
        weights, ids = route_topk(router_logits, self.top_k, self.renormalize)
        return self.moe_op(hidden, self.w13, self.w2, weights, ids, self.activation)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}")


def bind_fused_moe(model: nn.Module, op: MoeOp | None) -> int:
    """Make every `FusedMoE` layer of ``model`` call ``op``; returns how many there are.

    ``op`` None keeps the SDK default (e.g. a platform written before SDK 1.1
    that has no ``fused_moe``).
    """
    count = 0
    for module in model.modules():
        if getattr(module, "layer_kind", None) == "fused_moe":
            if op is not None:
                module.moe_op = op
            count += 1
    return count
