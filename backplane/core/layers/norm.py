"""RMSNorm as Llama-family models define it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale.

    The statistics are computed in float32 and the result is cast back to the
    input dtype *before* the scale is applied, matching transformers' Llama and
    Qwen norms bit for bit in half precision.
    """

    # Platforms may swap this layer for their own kernel (see Platform.prepare_model).
    layer_kind = "rms_norm"
    # forward takes ``residual`` (the add before the norm, in one call); a platform's
    # replacement that does not declare this is called without it.
    accepts_residual = True

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise over the last dimension (any leading shape). With ``residual``:
        ``s = x + residual`` (in x's dtype, as a plain add rounds it) and returns
        ``(norm(s), s)``, the pre-norm decoder's residual add and next norm in one call."""
        if residual is not None:
            summed = x + residual
            return self(summed), summed
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (self.hidden_size,), None, self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
