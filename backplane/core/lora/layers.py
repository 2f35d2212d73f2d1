"""A base linear plus the adapter slots' low-rank updates, applied per token."""

from __future__ import annotations

import torch
from torch import nn


class LoRAStepState:
    """What every LoRA layer reads during one forward: the step's token-to-slot mapping
    (None: no token uses an adapter, the layers add nothing) and the platform's op."""

    def __init__(self, add_lora) -> None:
        self.add_lora = add_lora
        self.mapping = None


class LoRALinear(nn.Module):
    """``base(x)`` plus, for each token whose request uses an adapter, ``B_s (A_s x)``.

    The slot buffers hold every resident adapter: ``lora_a [slots, P * R, in]`` and
    ``lora_b [slots, out, P * R]`` with the adapter's scaling folded into B, R the
    configured max rank and P the number of fused parts (3 for q|k|v, 2 for gate|up,
    1 otherwise). Part p uses rank rows ``[p * R, (p + 1) * R)`` and writes only its
    own output columns (``output_slices``); smaller ranks are zero-padded.
    """

    def __init__(self, base: nn.Module, in_features: int, output_slices: tuple[int, ...],
                 max_loras: int, max_rank: int, state: LoRAStepState,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.output_slices = output_slices
        self.state = state
        parts = len(output_slices)
        out_features = sum(output_slices)
        self.register_buffer("lora_a", torch.zeros(
            max_loras, parts * max_rank, in_features, dtype=dtype, device=device),
            persistent=False)
        self.register_buffer("lora_b", torch.zeros(
            max_loras, out_features, parts * max_rank, dtype=dtype, device=device),
            persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.state.mapping is not None:
            out = self._add_lora(out, x)
        return out

    # The slot loop and host-side mapping stay out of compiled graphs (like attention).
    @torch.compiler.disable
    def _add_lora(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        slices = self.output_slices if len(self.output_slices) > 1 else None
        return self.state.add_lora(out, x, self.lora_a, self.lora_b, self.state.mapping, slices)
