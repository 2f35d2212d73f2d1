"""Linear layers, including the fused ones whose weights are stacked at load time.

Fusing q/k/v (and gate/up) into one matmul matters on the CPU, where each
extra GEMM call costs dispatch time and re-reads the activations. Checkpoints
store the pieces separately, so a fused layer knows where each piece goes.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One ``nn.Linear`` whose output is several named projections concatenated.

    Args:
        in_features: input size.
        output_sizes: ``{shard_name: out_features}`` in output order, e.g.
            ``{"q": 64, "k": 32, "v": 32}``.
        bias: whether the projections carry a bias.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: dict[str, int],
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, sum(output_sizes.values()), bias=bias, dtype=dtype)
        self.output_sizes = dict(output_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.output_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    def shard_view(self, param_name: str, shard: str) -> torch.Tensor:
        """The rows of ``weight`` or ``bias`` that hold projection ``shard``."""
        param = getattr(self, param_name)
        start = self.shard_offsets[shard]
        return param.data.narrow(0, start, self.output_sizes[shard])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shards={self.output_sizes}"
