"""Graph capture contract: record the decode step once per padded batch size, replay it.

The model runner (at optimization levels that ask for graphs, on a platform
whose attention backend declares ``supports_graph_capture``) owns static input
buffers for the largest captured batch: token ids, positions, slot mapping,
sequence lengths, query start offsets and block table. At start-up it records
the decode step once per captured size over views of those buffers
(`capture_static`); every later uniform decode step writes its inputs into the
same buffers in place, padded to the next captured size, and replays
(`replay_static`). Whatever the recorded step read on the host at capture time
(shapes, Python ints) is frozen into the recording, exactly as in a CUDA graph.

At optimization level O3 the runner also records *piecewise graphs*: the model
forward traced (``make_fx``) and cut at its attention calls; each piece between
two attention calls is recorded with its own runner (``make_graph_runner()``
once per piece), keyed by the padded token count, over the tensors it reads
(weights, the runner's buffers, the previous piece's outputs). A piece may
return a tuple of tensors; ``replay_static`` returns what the recorded call
returned (a device graph: its static outputs, which the next piece was
recorded over, so nothing is copied). Attention runs eagerly between the
pieces, so the backend needs no ``supports_graph_capture`` for these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch


class GraphRunner(ABC):
    """Captures a callable at fixed (padded) batch sizes and replays it.

    The callable takes and returns tensors whose first dimension is the batch
    size. Two ways to use it:

    - `capture` / `replay` (SDK 1.0): the runner copies the example inputs into
      static buffers of its own and ``replay`` copies new inputs into them;
    - `capture_static` / `replay_static` (SDK 1.1, what the model runner uses):
      the caller owns the static buffers, records over them, and updates them
      in place before each replay, so a step costs no extra device copies. The
      defaults below fall back to `capture` / `replay` (correct, one copy more),
      so a 1.0 runner keeps working; override both to record over the caller's
      buffers directly.
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

    def capture_static(
        self, fn: Callable[..., torch.Tensor], static_inputs: list[torch.Tensor],
        batch_size: int,
    ) -> None:
        """Record ``fn(*static_inputs)`` over the caller's own buffers (SDK 1.1).

        The caller keeps ``static_inputs`` alive and writes each step's values
        into them in place before `replay_static`. Default: `capture` (which
        copies) and remember the buffers, so `replay_static` can hand them over.
        """
        if not hasattr(self, "_caller_buffers"):
            self._caller_buffers: dict[int, list[torch.Tensor]] = {}
        self._caller_buffers[batch_size] = list(static_inputs)
        self.capture(fn, static_inputs, batch_size)

    def replay_static(self, batch_size: int) -> torch.Tensor:
        """Replay the graph of ``batch_size`` over the buffers given to `capture_static`.

        Returns the graph's output buffer (overwritten by the next replay).
        """
        buffers = getattr(self, "_caller_buffers", {}).get(batch_size)
        if buffers is None:
            raise KeyError(
                f"no graph captured with capture_static for batch size {batch_size}; "
                f"captured: {self.captured_sizes()}")
        return self.replay(buffers, batch_size)

    def padded_size(self, batch_size: int) -> int | None:
        """Smallest captured size that fits ``batch_size``; None if none does."""
        for size in self.captured_sizes():
            if size >= batch_size:
                return size
        return None

    def memory_bytes(self) -> int | None:
        """Device memory the recorded graphs hold, when the platform can tell (SDK 1.1)."""
        return None
