"""The persistent batch: per-request state kept across steps in dense arrays.

Rows are updated incrementally — requests are added, removed and advanced —
instead of rebuilding every step's inputs from Python objects. Rows stay dense
(0..num_reqs-1): a removed row is filled by moving the last row into it.
"""

from __future__ import annotations

import numpy as np
import torch

from backplane.sampling_params import SamplingParams


def seeded_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The generator of output position ``position`` of a request seeded with ``seed``."""
    # A fixed odd multiplier spreads neighbouring (seed, position) pairs apart.
    mixed = (seed * 0x9E3779B97F4A7C15 + position) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


class InputBatch:
    """Token ids, progress, block tables and sampling settings of running requests."""

    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int,
                 vocab_size: int, device: torch.device | None = None) -> None:
        # Seeded requests' generators are made where the sampler draws its noise.
        self.device = device or torch.device("cpu")
        self.max_num_reqs = max_num_reqs
        self.vocab_size = vocab_size
        self.req_ids: list[str | None] = [None] * max_num_reqs
        self.req_id_to_row: dict[str, int] = {}
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int64)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.params: list[SamplingParams | None] = [None] * max_num_reqs
        # Seeds of seeded sampled requests (None: unseeded or greedy). Each output
        # position draws from its own generator, seeded from (seed, position): the
        # draws depend on neither the batch, nor preemption, nor speculation.
        self.seeds: list[int | None] = [None] * max_num_reqs
        # Structured-output matchers (None: unconstrained row).
        self.grammars: list = [None] * max_num_reqs
        # Speculative decoding: whether a row may get drafts (not with a grammar that
        # cannot roll back), and the most tokens the request may have.
        self.spec_ok = np.zeros(max_num_reqs, dtype=bool)
        # LoRA: the device slot of each row's adapter (-1: the base model); the runner
        # sets it when the row is added.
        self.lora_slots = np.full(max_num_reqs, -1, dtype=np.int32)
        self.max_total_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.max_model_len = max_model_len
        self.temperature = np.ones(max_num_reqs, dtype=np.float32)
        self.greedy = np.zeros(max_num_reqs, dtype=bool)
        self.num_reqs = 0
        self.removals = 0  # how many times rows were removed (see remove)

    # ------------------------------------------------------------- membership
    def add(self, req_id: str, token_ids: list[int], num_prompt_tokens: int,
            num_computed: int, block_ids: list[int], params: SamplingParams,
            grammar=None) -> None:
        row = self.num_reqs
        if row >= self.max_num_reqs:
            raise RuntimeError(f"persistent batch is full ({self.max_num_reqs} rows)")
        self.num_reqs += 1
        self.req_ids[row] = req_id
        self.req_id_to_row[req_id] = row
        n = len(token_ids)
        self.token_ids[row, :n] = token_ids
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = num_prompt_tokens
        self.num_computed[row] = num_computed
        self.num_blocks[row] = 0
        self.append_blocks(row, block_ids)
        self.params[row] = params
        self.greedy[row] = params.greedy
        self.temperature[row] = 1.0 if params.greedy else params.temperature
        self.seeds[row] = params.seed if params.seed is not None and not params.greedy else None
        self.lora_slots[row] = -1
        self.spec_ok[row] = grammar is None or grammar.supports_rollback
        limit = self.max_model_len
        if params.max_tokens is not None:
            limit = min(limit, num_prompt_tokens + params.max_tokens)
        self.max_total_tokens[row] = limit
        if grammar is not None:
            # A resumed request's matcher may have run ahead (a token dropped at
            # preemption): rebuild its state from the outputs kept.
            grammar.reset()
            if n > num_prompt_tokens and not grammar.accept_tokens(
                    [int(t) for t in token_ids[num_prompt_tokens:]]):
                raise RuntimeError(f"request {req_id}: its kept output no longer matches its "
                                   "structured-output grammar")
        self.grammars[row] = grammar

    def generators(self, rows: list[int], offsets: list[int] | None = None
                   ) -> dict[int, torch.Generator]:
        """{index in ``rows``: generator} for the seeded rows, at each row's next output
        position (plus ``offsets[i]``, for the later positions speculation verifies)."""
        out = {}
        for i, row in enumerate(rows):
            seed = self.seeds[row]
            if seed is not None:
                position = int(self.num_tokens[row] - self.num_prompt_tokens[row])
                if offsets is not None:
                    position += offsets[i]
                out[i] = seeded_generator(seed, position, self.device)
        return out

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        if block_ids:
            start = self.num_blocks[row]
            self.block_table[row, start : start + len(block_ids)] = block_ids
            self.num_blocks[row] = start + len(block_ids)

    def remove(self, req_ids: set[str]) -> None:
        """Drop rows, then refill the holes with the last rows to stay dense."""
        if not req_ids:
            return
        # Rows may move: a step launched before this (pipeline) finds its rows again.
        self.removals += 1
        holes = sorted(
            (self.req_id_to_row.pop(rid) for rid in req_ids if rid in self.req_id_to_row),
            reverse=True,
        )
        for hole in holes:
            last = self.num_reqs - 1
            if hole != last:
                self._move(last, hole)
            self.req_ids[last] = None
            self.params[last] = None
            self.seeds[last] = None
            self.grammars[last] = None
            self.num_reqs -= 1

    def _move(self, src: int, dst: int) -> None:
        rid = self.req_ids[src]
        self.req_ids[dst] = rid
        self.req_id_to_row[rid] = dst
        n = self.num_tokens[src]
        self.token_ids[dst, :n] = self.token_ids[src, :n]
        nb = self.num_blocks[src]
        self.block_table[dst, :nb] = self.block_table[src, :nb]
        for arr in (self.num_tokens, self.num_prompt_tokens, self.num_computed,
                    self.num_blocks, self.temperature, self.greedy, self.spec_ok,
                    self.max_total_tokens, self.lora_slots):
            arr[dst] = arr[src]
        self.params[dst] = self.params[src]
        self.seeds[dst] = self.seeds[src]
        self.grammars[dst] = self.grammars[src]
