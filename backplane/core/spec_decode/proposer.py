"""Who proposes drafts each step, for which rows, and how many.

After a step's tokens are known the runner calls `Proposer.propose`: rows that
sampled and may speculate get up to k drafts, capped so that the verified
tokens never pass the request's max_tokens or max_model_len. The drafts go back
to the scheduler, which sends them through the next step with the request's
known tokens. A draft model (or EAGLE head) is also fed every step's tokens, so
its KV cache, which shares the target's block table, keeps up with the target.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from backplane.config.configs import SpeculativeConfig
from backplane.core.model_runner.flat_batch import FlatBatch
from backplane.core.spec_decode.ngram import propose_ngram

logger = logging.getLogger(__name__)


class Proposer:
    """Drafts for the rows of the runner's persistent batch (n-gram or a model)."""

    def __init__(self, config: SpeculativeConfig, runner) -> None:
        self.config = config
        self.k = int(config.num_speculative_tokens)
        self.batch = runner.input_batch
        self.device = runner.device
        self.model_drafter = None
        if config.uses_model:
            from backplane.core.spec_decode.model_drafter import ModelDrafter

            self.model_drafter = ModelDrafter(config, runner)
        # Draft distributions of sampled (non-greedy) rows' pending drafts, needed
        # to verify them next step. Greedy rows and n-gram drafts need none.
        self._draft_probs: dict[str, torch.Tensor] = {}

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._draft_probs.pop(req_id, None)

    def draft_probs(self, req_ids: list[str], num_drafts: np.ndarray,
                    all_greedy: bool) -> torch.Tensor | None:
        """[sum(num_drafts), V] draft distributions of the rows being verified, or
        None when drafts are point proposals (n-gram) or every row is greedy."""
        if self.model_drafter is None or all_greedy:
            return None
        parts = []
        for req_id, count in zip(req_ids, num_drafts.tolist(), strict=True):
            if count == 0:
                continue
            probs = self._draft_probs.get(req_id)
            if probs is None:  # a greedy row: its q is never read
                probs = torch.zeros(count, self.batch.vocab_size, device=self.device)
            parts.append(probs[:count])
        if not parts:
            return None
        return torch.cat(parts)

    def max_drafts(self, rows: np.ndarray) -> np.ndarray:
        """Drafts each row may get now: 0 for rows that may not speculate, else up to
        k, leaving room for the token sampled after them within the request's limit."""
        batch = self.batch
        if (self.config.disable_by_batch_size is not None
                and batch.num_reqs >= self.config.disable_by_batch_size):
            return np.zeros(len(rows), dtype=np.int64)
        room = batch.max_total_tokens[rows] - batch.num_tokens[rows] - 1
        return np.where(batch.spec_ok[rows], np.clip(room, 0, self.k), 0)

    def propose(self, flat: FlatBatch, computed: np.ndarray, sample_mask: np.ndarray,
                hidden: torch.Tensor, result) -> None:
        """Put next step's drafts in ``result.spec_token_ids`` (rows that get some)."""
        batch = self.batch
        sampled_rows = flat.rows[sample_mask]
        limits = self.max_drafts(sampled_rows)
        if self.model_drafter is not None:
            drafts, counts, probs = self.model_drafter.propose(
                flat, computed, sample_mask, hidden, limits)
        elif limits.any():
            cfg = self.config
            num_tokens = batch.num_tokens[sampled_rows]
            # Only the known columns: the batch array is max_model_len wide.
            drafts, counts = propose_ngram(
                batch.token_ids[sampled_rows, : int(num_tokens.max())], num_tokens,
                min_n=cfg.prompt_lookup_min, max_n=cfg.prompt_lookup_max, k=self.k,
                max_drafts=limits)
            probs = None
        else:
            return
        for i, row in enumerate(sampled_rows.tolist()):
            req_id = batch.req_ids[row]
            count = int(counts[i])
            if count:
                result.spec_token_ids[req_id] = drafts[i, :count].tolist()
                if probs is not None and probs[i] is not None:
                    self._draft_probs[req_id] = probs[i]
                    continue
            self._draft_probs.pop(req_id, None)
