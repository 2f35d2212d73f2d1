"""PoolingEngineCore: batches prefill-only pooling requests and runs them (no KV cache).

A pooling request is one forward pass over its whole prompt followed by the
pooler, so there is no decode, no KV cache and nothing to reuse across steps:
each step takes waiting requests in arrival order (at most ``max_num_seqs``
requests and ``max_num_batched_tokens`` tokens; a single longer prompt runs
alone), pads them into one dense batch, runs the model with
`DensePrefillAttention` (bidirectional for encoders, causal for decoders) and
pools each request's hidden states. Every request finishes in the step that
runs it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from backplane.config.resolve import ResolvedConfig
from backplane.core.engine.engine_core import StepTiming
from backplane.core.layers.attention import AttentionContext
from backplane.core.pooling.attention import DensePrefillAttention
from backplane.core.pooling.pooler import finish_embedding, load_pooler_config, pool
from backplane.outputs import PoolingOutput, PoolingRequestOutput
from backplane.plugins_sdk import Platform
from backplane.pooling_params import PoolingParams

logger = logging.getLogger(__name__)


@dataclass
class PoolingRequest:
    request_id: str
    prompt: str | None
    token_ids: list[int]
    params: PoolingParams
    # Segment ids of a text pair (cross-encoders: 0 for the first text, 1 for the second).
    token_type_ids: list[int] | None = None


class PoolingEngineCore:
    """Owns the pooling model; ``step()`` runs one batch of waiting requests to completion."""

    def __init__(self, config: ResolvedConfig, platform: Platform) -> None:
        from backplane.core.loader.model_loader import load_model
        from backplane.core.loader.weights import resolve_model_dir

        self.config = config
        self.platform = platform
        self.device = platform.runtime.device()
        mc, spec = config.model_config, config.model_spec
        if config.compilation_config.compile:
            logger.info("pooling runner: the model runs eagerly (torch.compile is not used)")
        self.model = platform.prepare_model(load_model(mc, self.device), config)
        self.causal = bool(getattr(self.model, "is_causal", True))
        self.is_cross_encoder = bool(getattr(self.model, "is_cross_encoder", False))
        self.attention = DensePrefillAttention(
            spec.num_heads_per_rank, spec.num_kv_heads_per_rank, self.causal,
            spec.sliding_window,
        )
        self.pooler_config = load_pooler_config(resolve_model_dir(mc.model), mc.hf_config)
        self.hidden_size = int(mc.hf_config.hidden_size)
        self.num_layers = spec.num_layers
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        self.max_num_batched_tokens = config.scheduler_config.max_num_batched_tokens
        self.waiting: deque[PoolingRequest] = deque()
        self.last_step = StepTiming()
        logger.info(
            "pooling runner: %s pooling%s (%s), %s attention, no KV cache",
            self.pooler_config.pooling_type,
            ", normalized" if self.pooler_config.normalize else "",
            self.pooler_config.source, "causal" if self.causal else "bidirectional",
        )

    # --------------------------------------------------------------- requests
    def check_params(self, params: PoolingParams) -> None:
        """ValueError for options this model cannot honour (before anything is queued)."""
        task = params.task or "embed"
        if self.is_cross_encoder and task == "embed":
            raise ValueError(
                "this model is a cross-encoder (sequence classification): it scores text "
                "pairs and has no embeddings; use LLM.score, /score or /rerank"
            )
        if not self.is_cross_encoder and task == "score":
            raise ValueError("task 'score' needs a cross-encoder (sequence classification) "
                             "model; an embedding model scores by cosine similarity")
        dims = params.dimensions
        if self.is_cross_encoder and dims is not None:
            raise ValueError("dimensions is not supported by a cross-encoder")
        if dims is None or dims == self.hidden_size:
            return
        if not self.pooler_config.matryoshka:
            raise ValueError(
                f"dimensions ({dims}): the model does not support matryoshka representation "
                f"(its embeddings have {self.hidden_size} dimensions and cannot be shortened)"
            )
        if dims > self.hidden_size:
            raise ValueError(
                f"dimensions ({dims}) exceeds the model's embedding size ({self.hidden_size})"
            )

    def add_request(self, request: PoolingRequest) -> None:
        self.waiting.append(request)

    def abort(self, request_ids) -> None:
        ids = set(request_ids)
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------- step
    def _take_batch(self) -> list[PoolingRequest]:
        batch: list[PoolingRequest] = []
        tokens = 0
        while self.waiting and len(batch) < self.max_num_seqs:
            n = len(self.waiting[0].token_ids)
            if batch and tokens + n > self.max_num_batched_tokens:
                break
            batch.append(self.waiting.popleft())
            tokens += n
        return batch

    @torch.inference_mode()
    def step(self) -> list[PoolingRequestOutput]:
        start = time.perf_counter()
        batch = self._take_batch()
        if not batch:
            return []
        lens = [len(r.token_ids) for r in batch]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        device = self.device
        input_ids = torch.tensor([t for r in batch for t in r.token_ids], device=device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(device)
        meta = self.attention.build_metadata(lens, device)
        ctx = AttentionContext(self.attention, meta, [None] * self.num_layers)
        forward_start = time.perf_counter()
        if self.is_cross_encoder:
            type_ids = torch.tensor(
                [t for r in batch for t in (r.token_type_ids or [0] * len(r.token_ids))],
                device=device)
            hidden = self.model(input_ids, positions, ctx, type_ids)
            logits = self.model.classify(pool(hidden, cu, "CLS").to(hidden.dtype)).float()
        else:
            hidden = self.model(input_ids, positions, ctx)
            pooled = pool(hidden, cu, self.pooler_config.pooling_type)
        self.platform.runtime.synchronize()
        forward_seconds = time.perf_counter() - forward_start
        outputs = []
        for i, r in enumerate(batch):
            p = r.params
            if self.is_cross_encoder:
                # "score": the model's activation (sigmoid for one label); "encode": raw logits.
                vector = (self.model.activation(logits[i]) if p.task == "score"
                          else logits[i]).cpu()
                outputs.append(PoolingRequestOutput(
                    r.request_id, PoolingOutput(vector), r.token_ids, True, r.prompt))
                continue
            vector = finish_embedding(pooled[i], self.pooler_config, p.task or "embed",
                                      p.dimensions, p.normalize).cpu()
            outputs.append(PoolingRequestOutput(
                r.request_id, PoolingOutput(vector), r.token_ids, True, r.prompt))
        self.last_step = StepTiming(
            total_seconds=time.perf_counter() - start, forward_seconds=forward_seconds,
            num_tokens=cu[-1], num_reqs=len(batch),
        )
        return outputs
