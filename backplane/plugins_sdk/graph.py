"""Graph capture contract: record the decode step once per padded batch size, replay it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch


class GraphRunner(ABC):
    """Captures a callable at fixed (padded) batch sizes and replays it.

    The callable takes and returns tensors whose first dimension is the batch
    size; the runner owns static input/output buffers for each captured size.
    """

    @abstractmethod
    def capture(
        self, fn: Callable[..., torch.Tensor], example_inputs: list[torch.Tensor],
        batch_size: int,
    ) -> None:
        """Record ``fn(*example_inputs)`` for ``batch_size``."""

    @abstractmethod
    def captured_sizes(self) -> list[int]:
        """Batch sizes with a recorded graph, ascending."""

    @abstractmethod
    def replay(self, inputs: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """Copy ``inputs`` into the static buffers of ``batch_size`` and replay its graph."""

    def padded_size(self, batch_size: int) -> int | None:
        """Smallest captured size that fits ``batch_size``; None if none does."""
        for size in self.captured_sizes():
            if size >= batch_size:
                return size
        return None
