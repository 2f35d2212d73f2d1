"""Drafts from a model: a smaller draft model, or an EAGLE head over the target's states.

The drafter's KV cache has the target's blocks: same block ids, same slots,
its own per-layer tensors (sized together with the target's). Each step it is
fed what the target just computed and kept (a rejected draft's slot is written
again later, exactly as the target's is), then proposes k tokens one at a time.
The scheduler reserves k slots past every step's tokens for those proposals.

- ``draft_model`` feeds token t at position t, like any causal LM, and includes
  the token the target just sampled, whose logits give the first draft.
- ``eagle``/``eagle3`` feed, at position p, the target's hidden state at p (the
  final one, or three intermediate ones for EAGLE-3) with the token at p + 1;
  on later draft steps the head's own output replaces the target's state.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from backplane.config.configs import ModelConfig, SpeculativeConfig
from backplane.core.layers.attention import AttentionContext
from backplane.core.model_runner.flat_batch import FlatBatch
from backplane.core.model_runner.input_batch import seeded_generator
from backplane.core.model_runner.kv_cache_sizing import KVBlockLayout
from backplane.core.sampling.argmax import argmax_rows
from backplane.core.sampling.sampler import Sampler, sample_inverse_cdf
from backplane.plugins_sdk import AttentionSpec

logger = logging.getLogger(__name__)

# Draft draws of a seeded request use generators apart from its target draws.
_DRAFT_SEED_SALT = 0x5DEECE66D


class ModelDrafter:
    """A draft model or EAGLE head, its KV cache, and the k-step proposal loop."""

    def __init__(self, config: SpeculativeConfig, runner) -> None:
        self.method = config.method
        self.k = int(config.num_speculative_tokens)
        self.runner = runner
        self.device = runner.device
        block_size, dtype = runner.block_size, runner.dtype
        if self.method == "draft_model":
            from backplane.core.loader.model_loader import load_model

            draft_config = ModelConfig(model=config.model, max_model_len=runner.max_model_len)
            draft_config.torch_dtype = dtype
            self.model = load_model(draft_config, self.device)
            geometry = self.model.kv_cache_shape()
            spec = self.model.attention_spec(block_size, dtype,
                                             max_model_len=runner.max_model_len)
        else:
            from backplane.core.models.eagle import load_eagle_head

            self.model = load_eagle_head(config.model, runner.base_model, dtype, self.device)
            if self.model.aux_layer_ids:
                runner.base_model.set_aux_hidden_layers(self.model.aux_layer_ids)
            geometry = self.model.kv_cache_shape()
            spec = AttentionSpec(
                num_heads=geometry.num_heads, num_kv_heads=geometry.num_kv_heads,
                head_size=geometry.head_size, dtype=dtype, block_size=block_size)
        # The platform's own treatment (prepacked weights, fused layers, fused MoE) and
        # the target's compile setting: a draft runs k times per step, so it matters.
        from backplane.core.layers.fused_moe import bind_fused_moe

        bind_fused_moe(self.model, getattr(runner.platform, "fused_moe", None))
        self.model = runner.platform.prepare_model(self.model, runner.config)
        self._forward_model = runner._maybe_compile(self.model, runner.config, runner.platform)
        backend_cls = runner.platform.select_attention_backend(
            spec, forced=runner.config.device_config.attention_backend)
        self.backend_cls = backend_cls
        self.backend = backend_cls(spec)
        self.cache_shape_args = (block_size, geometry.num_kv_heads, geometry.head_size)
        self.layout = KVBlockLayout(geometry.num_layers, geometry.num_kv_heads,
                                    geometry.head_size, block_size, dtype)
        self.kv_caches: list[torch.Tensor] = []
        logger.info("speculative decoding: %s from %s, %d layer(s), k=%d, attention %s",
                    self.method, config.model, geometry.num_layers, self.k, backend_cls.name)

    @property
    def bytes_per_block(self) -> int:
        return self.layout.bytes_per_block

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = self.backend_cls.kv_cache_shape(num_blocks, *self.cache_shape_args)
        self.kv_caches = [
            self.backend_cls.allocate_kv_cache(shape, self.runner.dtype, self.device)
            for _ in range(self.layout.num_layers)
        ]

    # ---------------------------------------------------------------- forward
    def _forward(self, feed: FlatBatch, input_ids: np.ndarray,
                 hidden_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden for logits, hidden fed back next step) of one flat batch."""
        batch = self.runner.input_batch
        common = feed.attention_metadata(batch.block_table, self.runner.block_size, self.device)
        ctx = AttentionContext(self.backend, self.backend.build_metadata(common), self.kv_caches)
        ids = torch.from_numpy(input_ids).to(self.device)
        positions = torch.from_numpy(feed.positions).to(self.device)
        if self.method == "draft_model":
            return self._forward_model(ids, positions, ctx), None
        return self._forward_model(ids, positions, hidden_in, ctx)

    # ---------------------------------------------------------------- propose
    @torch.inference_mode()
    def propose(self, flat: FlatBatch, computed: np.ndarray, sample_mask: np.ndarray,
                hidden: torch.Tensor, limits: np.ndarray):
        """Feed this step's kept tokens, then draft up to ``limits[i]`` tokens for each
        sampled row i.

        Returns:
            (drafts [S, k] int64, counts [S], per sampled row its draft
            distributions [count, V] or None for greedy rows)
        """
        runner, batch = self.runner, self.runner.input_batch
        rows = flat.rows
        num_tokens = batch.num_tokens[rows]
        processed_end = computed + flat.counts
        # Target positions that are computed and kept (for EAGLE, each needs the token
        # after it); a row that sampled adds its new token for the draft model.
        if self.method == "draft_model":
            fed_end = np.where(sample_mask, num_tokens, processed_end)
        else:
            fed_end = np.where(sample_mask, num_tokens - 1, processed_end)
        feed = FlatBatch.build(rows, computed, fed_end - computed, batch.block_table,
                               runner.block_size)
        req_of_token = np.repeat(np.arange(len(rows)), feed.counts)
        hidden_in = None
        if self.method == "draft_model":
            input_ids = batch.token_ids[feed.token_rows, feed.positions]
        else:
            input_ids = batch.token_ids[feed.token_rows, feed.positions + 1]
            target_index = flat.starts[req_of_token] + (feed.positions - computed[req_of_token])
            states = (runner.base_model.aux_hidden_states() if self.model.aux_layer_ids
                      else hidden)
            hidden_in = states[torch.from_numpy(target_index).to(self.device)]
        out_logits, out_next = self._forward(feed, input_ids, hidden_in)

        sampled_index = np.nonzero(sample_mask)[0]
        num_sampled = len(sampled_index)
        drafts = np.full((num_sampled, self.k), -1, dtype=np.int64)
        counts = np.zeros(num_sampled, dtype=np.int64)
        probs: list[list[torch.Tensor] | None] = [None] * num_sampled
        active = np.nonzero(limits > 0)[0]  # indices into the sampled rows
        if len(active) == 0:
            return drafts, counts, probs
        draft_rows = rows[sampled_index[active]]
        meta = runner._sampling_metadata(draft_rows, None, None)
        last = torch.from_numpy(feed.cu[sampled_index[active]] - 1).to(self.device)
        h_logits = out_logits[last]
        h_next = None if out_next is None else out_next[last]
        # Position of the first draft: right after the row's known tokens.
        next_position = batch.num_tokens[draft_rows].copy()
        for step in range(self.k):
            tokens, q = self._draw(h_logits, meta, draft_rows, next_position)
            drafts[active, step] = tokens
            counts[active] += 1
            if q is not None:
                for j, i in enumerate(active.tolist()):
                    if q[j] is not None:
                        probs[i] = probs[i] or []
                        probs[i].append(q[j])
            more = limits[active] > step + 1
            if step + 1 == self.k or not more.any():
                break
            # Feed the draft just made to the rows that draft further.
            active, draft_rows = active[more], draft_rows[more]
            tokens, next_position = tokens[more], next_position[more]
            select = torch.from_numpy(np.nonzero(more)[0]).to(self.device)
            if not more.all():  # fewer rows now: their sampling inputs only
                meta = runner._sampling_metadata(draft_rows, None, None)
            fed_position = next_position - (0 if self.method == "draft_model" else 1)
            step_feed = FlatBatch.build(draft_rows, fed_position, np.ones(len(draft_rows),
                                        dtype=np.int64), batch.block_table, runner.block_size)
            h_in = None if h_next is None else h_next[select]
            h_logits, h_next = self._forward(step_feed, tokens, h_in)
            next_position = next_position + 1
        stacked = [None if p is None else torch.stack(p) for p in probs]
        return drafts, counts, stacked

    def _draw(self, hidden: torch.Tensor, meta, rows: np.ndarray, positions: np.ndarray
              ) -> tuple[np.ndarray, list[torch.Tensor | None] | None]:
        """One draft token per row (argmax for greedy rows, else drawn from the row's
        processed draft distribution q, which verification needs)."""
        runner, batch = self.runner, self.runner.input_batch
        processed = runner.sampler.process_logits(self.model.compute_logits(hidden), meta)
        if meta.all_greedy:
            return argmax_rows(processed).cpu().numpy(), None
        q = Sampler.probs(processed, meta)
        q = q / q.sum(dim=-1, keepdim=True)
        generators = {}
        for i, row in enumerate(rows.tolist()):
            seed = batch.seeds[row]
            if seed is not None:
                generators[i] = seeded_generator(seed ^ _DRAFT_SEED_SALT, int(positions[i]),
                                                 self.device)
        tokens = sample_inverse_cdf(q, generators)
        if meta.greedy_mask is not None:
            tokens = torch.where(meta.greedy_mask, argmax_rows(processed), tokens)
        greedy = batch.greedy[rows]
        per_row = [None if greedy[i] else q[i] for i in range(len(rows))]
        return tokens.cpu().numpy(), per_row
