"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a fused ``[n, 2*d]`` gate_up projection -> ``[n, d]``."""

    # Platforms may swap this layer for their own kernel (see Platform.prepare_model).
    layer_kind = "silu_and_mul"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        # silu allocates the result once; the product is written into it in place.
        out = F.silu(x[..., :d])
        return out.mul_(x[..., d:])
