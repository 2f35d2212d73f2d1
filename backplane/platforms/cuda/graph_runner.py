"""CUDA graph capture and replay of a fixed-shape callable (the decode step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from backplane.plugins_sdk import GraphRunner


@dataclass
class _CapturedGraph:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[torch.Tensor]
    static_output: torch.Tensor


class CudaGraphRunner(GraphRunner):
    """Records ``fn`` once per padded batch size into a `torch.cuda.CUDAGraph`.

    Each size owns static input buffers and the output tensor produced during
    capture; every graph allocates from one shared memory pool, so capturing
    many sizes costs about as much memory as the largest one (capture largest
    first). With `capture` the buffers are copies of the example inputs and
    ``replay`` copies new inputs into their leading rows (rows past them keep
    their previous contents, so callers whose padding rows matter pass inputs
    already padded); with `capture_static` (the model runner's way) they are
    the caller's own tensors, updated in place, and `replay_static` only
    launches the graph.
    """

    def __init__(self, warmup_iters: int = 2) -> None:
        self.warmup_iters = warmup_iters
        self._graphs: dict[int, _CapturedGraph] = {}
        self._pool = None
        self._pool_bytes = 0

    def capture(
        self, fn: Callable[..., torch.Tensor], example_inputs: list[torch.Tensor],
        batch_size: int,
    ) -> None:
        """Record ``fn(*example_inputs)`` as the graph for ``batch_size`` (inputs copied)."""
        self._record(fn, [t.clone() for t in example_inputs], batch_size)

    def capture_static(
        self, fn: Callable[..., torch.Tensor], static_inputs: list[torch.Tensor],
        batch_size: int,
    ) -> None:
        """Record over the caller's buffers: the caller updates them in place before replays."""
        self._record(fn, list(static_inputs), batch_size)

    def _record(self, fn, static_inputs: list[torch.Tensor], batch_size: int) -> None:
        # Lazy work (cuBLAS handles, Triton compilation, allocator growth) must
        # happen before capture, and on a side stream as capture requires.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        reserved_before = torch.cuda.memory_reserved()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = fn(*static_inputs)
        self._pool_bytes += max(0, torch.cuda.memory_reserved() - reserved_before)
        self._graphs[batch_size] = _CapturedGraph(graph, static_inputs, static_output)

    def replay_static(self, batch_size: int) -> torch.Tensor:
        """Replay the graph of ``batch_size``; its inputs were updated in place by the caller."""
        captured = self._graphs.get(batch_size)
        if captured is None:
            raise KeyError(
                f"no CUDA graph captured for batch size {batch_size}; "
                f"captured: {self.captured_sizes()}"
            )
        captured.graph.replay()
        return captured.static_output

    def memory_bytes(self) -> int:
        """Memory the caching allocator reserved while recording (the shared graph pool)."""
        return self._pool_bytes

    def captured_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def replay(self, inputs: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """Copy ``inputs`` into the graph of ``batch_size`` and replay it.

        Returns the graph's output (its first ``len(inputs[0])`` rows when the
        output's first dimension is the batch size). The tensor is the graph's
        static buffer: the next replay overwrites it.
        """
        captured = self._graphs.get(batch_size)
        if captured is None:
            raise KeyError(
                f"no CUDA graph captured for batch size {batch_size}; "
                f"captured: {self.captured_sizes()}"
            )
        if len(inputs) != len(captured.static_inputs):
            raise ValueError(
                f"replay got {len(inputs)} inputs; the graph for batch size {batch_size} "
                f"was captured with {len(captured.static_inputs)}"
            )
        for i, (new, static) in enumerate(zip(inputs, captured.static_inputs, strict=True)):
            if new.shape[1:] != static.shape[1:] or new.shape[0] > static.shape[0]:
                raise ValueError(
                    f"replay input {i} has shape {tuple(new.shape)}; the graph for batch size "
                    f"{batch_size} holds {tuple(static.shape)}"
                )
            static[: new.shape[0]].copy_(new, non_blocking=True)
        captured.graph.replay()
        out = captured.static_output
        rows = inputs[0].shape[0] if inputs and inputs[0].dim() else batch_size
        if out.dim() and out.shape[0] == batch_size and rows < batch_size:
            return out[:rows]
        return out
