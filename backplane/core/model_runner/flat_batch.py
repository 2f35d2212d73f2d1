"""One step's flat token batch: positions, slots and attention metadata, built with numpy.

Shared by the target model's step and the draft model's (speculative decoding),
so both lay their tokens out, and address the paged KV cache, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backplane.plugins_sdk import CommonAttentionMetadata


@dataclass
class FlatBatch:
    """Requests' query tokens one after another.

    Attributes:
        rows: batch rows in the step, in flat order.
        counts: query tokens of each row.
        starts: flat index of each row's first query token.
        cu: cumulative counts (``starts + counts``).
        positions: [total] position of each query token in its request.
        token_rows: [total] batch row of each query token.
        slots: [total] KV cache slot of each query token.
        seq_lens: per row, tokens with KV after this step (context + query).
    """

    rows: np.ndarray
    counts: np.ndarray
    starts: np.ndarray
    cu: np.ndarray
    positions: np.ndarray
    token_rows: np.ndarray
    slots: np.ndarray
    seq_lens: np.ndarray

    @classmethod
    def build(cls, rows: np.ndarray, first_positions: np.ndarray, counts: np.ndarray,
              block_table: np.ndarray, block_size: int) -> FlatBatch:
        """Rows ``rows`` advance by ``counts`` tokens from ``first_positions``."""
        cu = np.cumsum(counts)
        total = int(cu[-1])
        starts = cu - counts
        req_of_token = np.repeat(np.arange(len(rows)), counts)
        positions = first_positions[req_of_token] + (np.arange(total) - starts[req_of_token])
        token_rows = rows[req_of_token]
        slots = (block_table[token_rows, positions // block_size] * block_size
                 + positions % block_size)
        return cls(rows, counts, starts, cu, positions, token_rows, slots,
                   first_positions + counts)

    @property
    def total(self) -> int:
        return int(self.cu[-1])

    def attention_metadata(self, block_table: np.ndarray, block_size: int,
                           device: torch.device) -> CommonAttentionMetadata:
        """The backend-independent metadata of this batch, tensors moved once."""
        seq_lens = self.seq_lens.astype(np.int32)
        max_blocks = int(-(-seq_lens.max() // block_size))
        query_start_loc = np.concatenate(([0], self.cu)).astype(np.int32)
        return CommonAttentionMetadata(
            num_reqs=len(self.rows),
            num_actual_tokens=self.total,
            max_query_len=int(self.counts.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc=torch.from_numpy(query_start_loc).to(device),
            seq_lens=torch.from_numpy(seq_lens).to(device),
            block_table=torch.from_numpy(
                block_table[self.rows, :max_blocks].astype(np.int32)).to(device),
            slot_mapping=torch.from_numpy(self.slots).to(device),
            query_start_loc_cpu=torch.from_numpy(query_start_loc),
            seq_lens_cpu=torch.from_numpy(seq_lens),
        )
