"""Acme's graph runner: records the decode step as an operator graph and replays it.

A real accelerator's runner would record device work (a CUDA graph, a command
buffer). Acme computes on the CPU, so it records at the level torch can:
``make_fx`` traces ``fn`` once into the flat list of ATen operators it runs,
with every shape, every Python-level decision and every constant frozen at
capture, exactly what a device graph freezes. Replay runs that list over the
static inputs, skipping the model's Python. Like a device graph:

- a step whose host code reads device values (``.item()``, ``.tolist()``)
  cannot be recorded (tracing refuses it), so the backend's decode metadata
  must be pure tensors;
- tensors the step closes over (weights, KV cache) are recorded by reference,
  so replay writes the real KV cache;
- inputs changed in place between replays are seen by the next replay.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from backplane.plugins_sdk import GraphRunner
from torch.fx.experimental.proxy_tensor import make_fx


@dataclass
class _Recording:
    graph: torch.fx.GraphModule
    inputs: list[torch.Tensor]


class RecordingGraphRunner(GraphRunner):
    """Operator-graph capture on the CPU (see the module docstring)."""

    def __init__(self) -> None:
        self._recordings: dict[int, _Recording] = {}
        # How often each size was replayed: lets tests see graphs really ran.
        self.replay_counts: Counter[int] = Counter()

    def capture(self, fn: Callable[..., torch.Tensor], example_inputs: list[torch.Tensor],
                batch_size: int) -> None:
        self.capture_static(fn, [t.clone() for t in example_inputs], batch_size)

    def capture_static(self, fn: Callable[..., torch.Tensor], static_inputs: list[torch.Tensor],
                       batch_size: int) -> None:
        # Traced through a plain *args wrapper: tracing counts a bound method's self.
        graph = make_fx(lambda *args: fn(*args))(*static_inputs)
        self._recordings[batch_size] = _Recording(graph, list(static_inputs))

    def captured_sizes(self) -> list[int]:
        return sorted(self._recordings)

    def replay(self, inputs: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        recording = self._recording(batch_size)
        for new, static in zip(inputs, recording.inputs, strict=True):
            static[: new.shape[0]].copy_(new)
        out = self.replay_static(batch_size)
        rows = inputs[0].shape[0] if inputs and inputs[0].dim() else batch_size
        return out[:rows] if out.dim() and out.shape[0] == batch_size else out

    def replay_static(self, batch_size: int) -> torch.Tensor:
        recording = self._recording(batch_size)
        self.replay_counts[batch_size] += 1
        return recording.graph(*recording.inputs)

    def _recording(self, batch_size: int) -> _Recording:
        recording = self._recordings.get(batch_size)
        if recording is None:
            raise KeyError(f"no graph recorded for batch size {batch_size}; "
                           f"recorded: {self.captured_sizes()}")
        return recording
