"""Uniform decode steps as recorded graphs: static buffers, start-up capture, padded replay.

At optimization levels with graphs (O2, O3) the model runner records the
model forward of a uniform decode step (every request advances by one token)
once per captured batch size, through the platform's `GraphRunner`, and
replays it for every later decode batch, padded to the next captured size.
Replay skips the per-layer Python of the model and the attention backend: on
an accelerator the host only writes five small input buffers and launches one
graph.

The buffers below belong to this class and live as long as the engine: every
graph was recorded over views of them, so a step writes its values into them
in place (never re-allocates) before replaying. Padding rows get slot -1 (the
attention backend writes nothing for them), sequence length 1, token 0,
position 0 and a zero block-table row; their hidden states are dropped, so
padding never touches the KV cache and never produces output.

Mixed batches (prefill chunks, or more requests than the largest captured
size) run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from backplane.plugins_sdk import CommonAttentionMetadata, GraphRunner

logger = logging.getLogger(__name__)

# Per token of the largest captured batch, in elements of the model dtype: what
# one recorded decode step keeps alive in the graph pool at its peak (residual,
# normed input, q/k/v, attention output, the MLP's gate/up/activation). Used to
# hold memory back from the KV cache before the graphs exist; the log compares
# it with what the capture really took where the platform can measure it.
_ACTIVATION_ELEMENTS_PER_HIDDEN = 8
_ACTIVATION_ELEMENTS_PER_INTERMEDIATE = 4
# Fixed cost per recorded graph (launch parameters, allocator segments). On an H200,
# 11 decode graphs (batch 1..64) took 36 MiB for the qwen2-0.5b shape and 34 MiB for
# llama-1b, i.e. about 3 MiB per graph on top of the activations.
_PER_GRAPH_BYTES = 3 * 2**20
# Outputs a piecewise piece keeps per token (hidden states, residual, q/k/v), in
# hidden-sized values: the next piece was recorded reading them.
_PIECE_OUTPUT_ELEMENTS_PER_HIDDEN = 4


def estimate_graph_memory(
    sizes: list[int], hidden_size: int, intermediate_size: int, dtype: torch.dtype,
    pools: int = 1,
) -> int:
    """Bytes to hold back from the KV cache for graphs captured at ``sizes``.

    The graphs of one runner allocate from one pool, so the largest size dominates.
    Piecewise graphs have one runner (``pools``) per piece, and each size's outputs
    stay alive (the next piece was recorded reading them): per pool the largest
    size's activations plus every size's outputs (hidden-sized values a token);
    each piece is a small part of a whole step, so the fixed cost is counted once
    per size.
    """
    if not sizes:
        return 0
    element = torch.empty((), dtype=dtype).element_size()
    per_token = (_ACTIVATION_ELEMENTS_PER_HIDDEN * hidden_size
                 + _ACTIVATION_ELEMENTS_PER_INTERMEDIATE * intermediate_size) * element
    kept = 0 if pools == 1 else sum(sizes) * _PIECE_OUTPUT_ELEMENTS_PER_HIDDEN * hidden_size
    return pools * (max(sizes) * per_token + kept * element) + len(sizes) * _PER_GRAPH_BYTES


class DecodeGraphs:
    """Static decode buffers, the capture of every size, and padded replay.

    ``forward(common)`` runs the model for a step described by ``common``;
    it is what gets recorded.
    """

    def __init__(
        self,
        graph_runner: GraphRunner,
        sizes: list[int],
        forward: Callable[[torch.Tensor, torch.Tensor, CommonAttentionMetadata], torch.Tensor],
        *,
        max_blocks_per_req: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.graph_runner = graph_runner
        self.sizes = sorted(set(sizes))
        self.max_size = self.sizes[-1]
        self._forward = forward
        self.max_model_len = max_model_len
        n, width = self.max_size, max_blocks_per_req
        # The static buffers every graph reads (see the module docstring).
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, width, dtype=torch.int32, device=device)
        # Host staging of one padded step, written with numpy then copied once per buffer.
        self._host_ids = np.zeros(n, dtype=np.int64)
        self._host_positions = np.zeros(n, dtype=np.int64)
        self._host_slots = np.full(n, -1, dtype=np.int64)
        self._host_seq_lens = np.ones(n, dtype=np.int32)
        self._host_blocks = np.zeros((n, width), dtype=np.int32)
        # (real batch size, replayed size) -> number of replays: what tests and logs read.
        self.replays: Counter[tuple[int, int]] = Counter()
        self.capture_seconds = 0.0
        self.capture_memory_bytes: int | None = None

    def _static_inputs(self, size: int) -> list[torch.Tensor]:
        return [self.input_ids[:size], self.positions[:size], self.slot_mapping[:size],
                self.seq_lens[:size], self.query_start_loc[: size + 1], self.block_table[:size]]

    def _step(self, input_ids, positions, slot_mapping, seq_lens, query_start_loc, block_table):
        """The recorded function: one uniform decode step over the given static views."""
        size = input_ids.shape[0]
        common = CommonAttentionMetadata(
            num_reqs=size,
            num_actual_tokens=size,
            max_query_len=1,
            # Replays may reach any length, so the recording assumes the longest.
            max_seq_len=self.max_model_len,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=slot_mapping,
            # Capture-time values only; a capturable backend never reads them.
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32),
            seq_lens_cpu=torch.ones(size, dtype=torch.int32),
        )
        return self._forward(input_ids, positions, common)

    def capture(self, measure_free_memory: Callable[[], int] | None = None) -> None:
        """Record every size, largest first (smaller graphs then reuse the pool's memory)."""
        free_before = measure_free_memory() if measure_free_memory else None
        start = time.perf_counter()
        bar = tqdm(sorted(self.sizes, reverse=True), desc="Capturing decode graphs",
                   unit="graph", disable=len(self.sizes) < 2, leave=False)
        for size in bar:
            self.graph_runner.capture_static(self._step, self._static_inputs(size), size)
        self.capture_seconds = time.perf_counter() - start
        measured = self.graph_runner.memory_bytes()
        if measured is None and free_before is not None:
            # A platform whose free memory does not move (a simulated device) says nothing.
            measured = (free_before - measure_free_memory()) or None
        self.capture_memory_bytes = measured
        captured = self.graph_runner.captured_sizes()
        missing = sorted(set(self.sizes) - set(captured))
        if missing:
            raise RuntimeError(
                f"graph runner {type(self.graph_runner).__name__} did not record batch "
                f"sizes {missing} (it holds {captured})")
        logger.info(
            "captured %d decode graphs (batch sizes %s) in %.2f s, %s", len(self.sizes),
            _size_ladder(self.sizes), self.capture_seconds,
            "memory not measurable on this platform" if measured is None
            else f"{measured / 2**20:.1f} MiB of graph memory",
        )

    def padded_size(self, num_reqs: int) -> int | None:
        """The captured size a decode batch of ``num_reqs`` replays; None: run eagerly."""
        if num_reqs > self.max_size:
            return None
        return self.graph_runner.padded_size(num_reqs)

    def replay(
        self, size: int, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
        seq_lens: np.ndarray, block_rows: np.ndarray,
    ) -> torch.Tensor:
        """Hidden states [n, hidden] of a uniform decode step of n requests (n <= size)."""
        n = len(input_ids)
        ids, pos, slot, lens, blocks = (self._host_ids, self._host_positions, self._host_slots,
                                        self._host_seq_lens, self._host_blocks)
        ids[:n], pos[:n], slot[:n], lens[:n] = input_ids, positions, slots, seq_lens
        ids[n:size], pos[n:size], slot[n:size], lens[n:size] = 0, 0, -1, 1
        width = block_rows.shape[1]
        blocks[:n, :width] = block_rows
        blocks[:n, width:] = 0
        blocks[n:size] = 0
        # In place: the graphs hold these very tensors.
        self.input_ids[:size].copy_(torch.from_numpy(ids[:size]), non_blocking=True)
        self.positions[:size].copy_(torch.from_numpy(pos[:size]), non_blocking=True)
        self.slot_mapping[:size].copy_(torch.from_numpy(slot[:size]), non_blocking=True)
        self.seq_lens[:size].copy_(torch.from_numpy(lens[:size]), non_blocking=True)
        self.block_table[:size].copy_(torch.from_numpy(blocks[:size]), non_blocking=True)
        hidden = self.graph_runner.replay_static(size)
        self.replays[(n, size)] += 1
        return hidden[:n]


def _size_ladder(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else (
        f"{', '.join(map(str, sizes[:4]))}, ..., {sizes[-1]}")
