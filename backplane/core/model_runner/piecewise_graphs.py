"""Piecewise graphs (optimization level O3): the model forward recorded in pieces
between the attention calls, for any batch (prefill chunks, mixed, decode).

Decode graphs (graph_capture.py) record a whole uniform decode step, which the
attention backend must allow (its metadata in static buffers). Piecewise graphs
need nothing of the backend: attention runs eagerly, with the step's own
metadata, and only the layers between two attention calls (norms, projections,
rotary embedding, MLP, residuals) are recorded. What is replayed then covers
every kind of batch, prefill chunks included.

How, for each captured token count S (``piecewise_capture_sizes``):

1. The forward over S tokens is traced with ``make_fx`` into one operator graph
   in which each attention call is the single opaque op
   ``backplane::piecewise_attention`` (layers/attention.py).
2. The graph is cut at those ops (``torch.fx`` ``split_module``): pieces between
   them, and one piece per attention call.
3. Each piece between attention calls is recorded through a `GraphRunner` of
   the platform (one runner per piece, keyed by S), over the very tensors it
   will read: the runner's token id and position buffers, the weights, and the
   outputs of the piece before it. A piece whose input comes from elsewhere
   (an attention output, or a runner that returns fresh tensors) has it copied
   into the recorded tensor before the replay.

A step of T <= max(S) tokens writes its ids and positions into the static
buffers, padded to the next captured S (token 0, position 0), and runs the
pieces in order. The attention op computes the first T rows only (no KV
write for padding, zero output for it); every other op works row by row, so
padding never reaches a real token and is dropped at the end.

Limits: the model's layers must be traceable by ``make_fx`` (torch operators
or registered custom ops); each piece has its own graph runner (and, on a GPU,
its own memory pool); split models (collectives inside pieces), LoRA and
speculative decoding run without them (the runner says why at start-up).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch import fx
from tqdm.auto import tqdm

from backplane.core.layers.attention import PIECEWISE
from backplane.plugins_sdk import GraphRunner

logger = logging.getLogger(__name__)

_ATTENTION_OP = torch.ops.backplane.piecewise_attention.default


class _RecordedPiece(torch.nn.Module):
    """One piece between attention calls, replayed through its graph runner."""

    def __init__(self, runner: GraphRunner, size: int, static_inputs: list) -> None:
        super().__init__()
        self.runner, self.size, self.static_inputs = runner, size, static_inputs

    def forward(self, *args):
        for new, static in zip(args, self.static_inputs, strict=True):
            # The piece before it returned the recorded tensor itself (a device graph's
            # static output) or the same weights: nothing to copy.
            if isinstance(new, torch.Tensor) and new.data_ptr() != static.data_ptr():
                static.copy_(new)
        return self.runner.replay_static(self.size)


def _split_at_attention(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The traced forward cut into pieces: ``submod_<i>``, each attention op alone."""
    from torch.fx.passes.split_module import split_module

    part, assignment = 0, {}
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is _ATTENTION_OP:
            assignment[node] = part + 1
            part += 2
        else:
            assignment[node] = part
    return split_module(graph_module, graph_module, assignment.__getitem__,
                        keep_original_order=True)


def _is_attention_piece(piece: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target is _ATTENTION_OP for n in piece.graph.nodes)


class PiecewiseGraphs:
    """The pieces of every captured token count, their capture and padded replay.

    ``forward(input_ids, positions)`` is the model forward (attention reads the
    step from `layers.attention.PIECEWISE`); ``make_runner()`` makes a platform
    graph runner.
    """

    def __init__(self, make_runner: Callable[[], GraphRunner], sizes: list[int],
                 forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 device: torch.device) -> None:
        self.sizes = sorted(set(sizes))
        self.max_size = self.sizes[-1]
        self._make_runner = make_runner
        self._forward = forward
        self.input_ids = torch.zeros(self.max_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_size, dtype=torch.int64, device=device)
        self._host_ids = np.zeros(self.max_size, dtype=np.int64)
        self._host_positions = np.zeros(self.max_size, dtype=np.int64)
        self._runners: list[GraphRunner] = []  # one per recorded piece, shared by the sizes
        self._split: dict[int, fx.GraphModule] = {}
        # (real token count, replayed size) -> replays: what tests and logs read.
        self.replays: Counter[tuple[int, int]] = Counter()
        self.num_pieces = 0
        self.capture_seconds = 0.0

    def capture(self) -> None:
        """Trace, split and record every size, largest first."""
        from torch.fx.experimental.proxy_tensor import make_fx

        start = time.perf_counter()
        bar = tqdm(sorted(self.sizes, reverse=True), desc="Capturing piecewise graphs",
                   unit="size", disable=len(self.sizes) < 2, leave=False)
        for size in bar:
            ids, positions = self.input_ids[:size], self.positions[:size]
            PIECEWISE.tracing = True
            try:
                traced = make_fx(self._forward)(ids, positions)
            finally:
                PIECEWISE.tracing = False
            split = _split_at_attention(traced)
            self._record_pieces(split, size, ids, positions)
            self._split[size] = split
        self.capture_seconds = time.perf_counter() - start
        memory = self.memory_bytes()
        logger.info("captured piecewise graphs: %d recorded pieces x %d token counts (%s) in "
                    "%.2f s, %s; attention runs eagerly between them", self.num_pieces,
                    len(self.sizes), ", ".join(map(str, self.sizes)), self.capture_seconds,
                    "memory not measurable on this platform" if memory is None
                    else f"{memory / 2**20:.1f} MiB of graph memory")

    def _record_pieces(self, split: fx.GraphModule, size: int, ids: torch.Tensor,
                       positions: torch.Tensor) -> None:
        """Run the split forward once, recording each piece between attention calls over
        the tensors it reads, and put its replaying stand-in in its place."""
        values: dict[str, object] = {}
        inputs = iter((ids, positions))
        recorded = 0
        for node in split.graph.nodes:
            if node.op == "placeholder":
                values[node.name] = next(inputs)
            elif node.op == "get_attr":
                values[node.name] = getattr(split, node.target)
            elif node.op == "call_module":
                piece = getattr(split, node.target)
                args = [fx.node.map_arg(a, lambda n: values[n.name]) for a in node.args]
                if _is_attention_piece(piece):
                    values[node.name] = piece(*args)
                    continue
                if recorded == len(self._runners):
                    self._runners.append(self._make_runner())
                runner = self._runners[recorded]
                recorded += 1
                runner.capture_static(piece, args, size)
                values[node.name] = runner.replay_static(size)
                setattr(split, node.target, _RecordedPiece(runner, size, args))
            elif node.op == "call_function":  # getitem of a piece's outputs
                values[node.name] = node.target(
                    *[fx.node.map_arg(a, lambda n: values[n.name]) for a in node.args])
        self.num_pieces = recorded

    def memory_bytes(self) -> int | None:
        """Device memory the pieces' graphs hold, when the platform can tell."""
        sizes = [r.memory_bytes() for r in self._runners]
        known = [b for b in sizes if b is not None]
        return sum(known) if known else None

    def padded_size(self, num_tokens: int) -> int | None:
        """The captured token count a step of ``num_tokens`` replays; None: run eagerly."""
        return next((s for s in self.sizes if s >= num_tokens), None)

    def run(self, size: int, input_ids: np.ndarray, positions: np.ndarray,
            ctx) -> torch.Tensor:
        """Final hidden states [n, hidden] of a step of n <= size tokens, attention
        computed with ``ctx`` (the step's `AttentionContext`)."""
        n = len(input_ids)
        ids, pos = self._host_ids, self._host_positions
        ids[:n], pos[:n] = input_ids, positions
        ids[n:size], pos[n:size] = 0, 0
        self.input_ids[:size].copy_(torch.from_numpy(ids[:size]), non_blocking=True)
        self.positions[:size].copy_(torch.from_numpy(pos[:size]), non_blocking=True)
        PIECEWISE.ctx, PIECEWISE.num_tokens = ctx, n
        try:
            hidden = self._split[size](self.input_ids[:size], self.positions[:size])
        finally:
            PIECEWISE.ctx = None
        self.replays[(n, size)] += 1
        return hidden[:n]
