"""Acme's attention backend: the SDK's reference paged attention, with Acme's limits.

A real plugin would call its device kernels in ``forward``; this one reuses
`backplane.plugins_sdk.ReferenceAttentionBackend` (plain torch ops) and only
declares what the "hardware" supports, so Backplane can explain refusals.
"""

from __future__ import annotations

import torch
from backplane.plugins_sdk import ReferenceAttentionBackend


class AcmeAttentionBackend(ReferenceAttentionBackend):
    """Paged attention for Acme: float32/bfloat16, block sizes 8, 16 or 32."""

    name = "acme_paged"
    supported_dtypes = (torch.float32, torch.bfloat16)
    supported_block_sizes = (8, 16, 32)
