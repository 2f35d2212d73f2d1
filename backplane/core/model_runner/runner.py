"""ModelRunner: persistent batch -> flat inputs -> forward -> sample.

Input preparation is vectorised over the batch with numpy (no per-token Python)
and the attention metadata is built once per step by the platform's backend.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from backplane.config.resolve import ResolvedConfig
from backplane.core.distributed.parallel_state import get_parallel_state
from backplane.core.layers.attention import AttentionContext
from backplane.core.layers.fused_moe import bind_fused_moe
from backplane.core.model_runner.flat_batch import FlatBatch
from backplane.core.model_runner.graph_capture import DecodeGraphs, estimate_graph_memory
from backplane.core.model_runner.input_batch import InputBatch
from backplane.core.model_runner.kv_cache_sizing import KVBlockLayout, determine_num_blocks
from backplane.core.model_runner.kv_scales import KVScales
from backplane.core.model_runner.piecewise_graphs import PiecewiseGraphs
from backplane.core.sampling.argmax import argmax_rows
from backplane.core.sampling.metadata import SamplingMetadata
from backplane.core.sampling.sampler import Sampler, gather_logprobs
from backplane.core.scheduler.output import SchedulerOutput
from backplane.core.spec_decode.rejection_sampler import rejection_sample
from backplane.plugins_sdk import CommonAttentionMetadata, Platform
from backplane.plugins_sdk.attention import is_fp8_kv_cache

logger = logging.getLogger(__name__)


@dataclass
class TokenLogprobs:
    """Logprobs at one or more positions: ids[:, 0] is the actual token, then the top-k."""

    ids: np.ndarray  # [positions, 1 + k] int64
    logprobs: np.ndarray  # [positions, 1 + k] float32
    ranks: np.ndarray  # [positions] rank of the actual token


@dataclass
class ModelRunnerOutput:
    """Per-step results keyed by request id."""

    # Tokens each sampling request got this step: one, or with speculative decoding
    # its accepted drafts and one more.
    sampled: dict[str, list[int]] = field(default_factory=dict)
    # Speculative decoding: drafts proposed for the next step.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    forward_seconds: float = 0.0
    # Requests whose structured-output grammar ended with this step's token.
    grammar_finished: set[str] = field(default_factory=set)
    # Time spent filling and moving the grammar bitmasks this step.
    grammar_mask_seconds: float = 0.0
    # Time this rank spent in collectives (tensor/pipeline parallel) this step.
    comm_seconds: float = 0.0


@dataclass
class LaunchedStep:
    """A step whose forward `ModelRunner.launch` started; `ModelRunner.collect` ends it.

    ``flat`` is None for a plan with nothing to compute. ``hidden`` is None on
    pipeline stage 0 until the last stage's activations come back. Per scheduled
    row, in flat order: ``rows`` (batch rows at the launch; ``removals`` tells
    whether they may have moved since), ``computed`` (tokens computed before the
    step), ``drafts``, ``sample_mask`` and, in a pipeline, ``req_ids`` and
    ``params``.
    """

    comm_start: float
    flat: FlatBatch | None = None
    hidden: torch.Tensor | None = None
    forward_seconds: float = 0.0
    rows: np.ndarray | None = None
    removals: int = 0
    req_ids: list[str] = field(default_factory=list)
    params: list = field(default_factory=list)
    computed: np.ndarray | None = None
    drafts: np.ndarray | None = None
    sample_mask: np.ndarray | None = None


@dataclass(frozen=True)
class _CombinedLayout:
    """KV sizing of the target and a draft model together (one block id, both caches)."""

    block_size: int
    bytes_per_block: int


class ModelRunner:
    """Owns the model, its KV cache and the persistent batch on one device."""

    def __init__(self, config: ResolvedConfig, platform: Platform) -> None:
        from backplane.core.loader.model_loader import load_model

        self.config = config
        self.platform = platform
        parallel = get_parallel_state()
        self.parallel = parallel  # this runner's groups, read once (see single_rank_state)
        self.world = parallel.world
        # Pipeline stage 0 holds the output head: only its ranks compute logits.
        self.holds_logits = parallel.pp.is_first
        # Under torchrun every rank runs the whole engine, scheduler included.
        self.every_rank_schedules = (
            config.parallel_config.distributed_executor_backend == "external_launcher")
        self.device = platform.runtime.device(platform.device_index(parallel.local_rank))
        mc, cc = config.model_config, config.cache_config
        self.dtype = mc.torch_dtype
        self.block_size = cc.block_size
        self.max_model_len = config.max_model_len

        model = load_model(mc, self.device)
        # MoE layers compute their experts with the platform's fused-MoE op
        # (SDK default when the platform predates it); prepare_model may still swap them.
        bind_fused_moe(model, getattr(platform, "fused_moe", None))
        # LoRA targets are read from the model as built (fused layers still know their
        # parts); the platform's prepared modules keep the same names.
        lora_targets = None
        if config.lora_config is not None:
            from backplane.lora import lora_targets as find_lora_targets

            lora_targets = find_lora_targets(model)
        model = platform.prepare_model(model, config)
        self.lora = None
        if lora_targets is not None:
            from backplane.core.lora import LoRAManager

            lc = config.lora_config
            self.lora = LoRAManager(model, lora_targets, lc.max_loras, lc.max_lora_rank,
                                    platform.add_lora, self.dtype, self.device)
        # The cache is laid out from the resolved ModelSpec; the model built from the
        # same HF config must agree, or attention, cache and model disagree on shapes.
        spec_model = config.model_spec
        num_layers, kv_heads, head_size = (
            spec_model.num_layers, spec_model.num_kv_heads_per_rank, spec_model.head_size)
        geometry = model.kv_cache_shape()
        if (geometry.num_layers, geometry.num_kv_heads, geometry.head_size) != (
            num_layers, kv_heads, head_size
        ):
            raise ValueError(
                f"model {spec_model.architecture} builds KV layers x heads x head size "
                f"{geometry.num_layers} x {geometry.num_kv_heads} x {geometry.head_size}, but "
                f"the resolved config says {num_layers} x {kv_heads} x {head_size}"
            )
        # The uncompiled model: EAGLE heads share its embeddings and read its states.
        self.base_model = model
        self.model = self._maybe_compile(model, config, platform)
        # The same spec validation used, so a backend accepted there is the one used here.
        spec = config.attention_spec()
        backend_cls = platform.select_attention_backend(
            spec, forced=config.device_config.attention_backend
        )
        self.attn_backend = backend_cls(spec)
        self._init_layer_backends(model, backend_cls, spec)
        # The cache's own dtype (fp8: one byte an element), so the same memory holds
        # twice bf16's blocks.
        self.kv_cache_dtype = spec_model.kv_cache_dtype
        # Pipeline parallel: only this stage's layers hold a cache (and count in its size).
        self.local_layers = model.local_layer_ids()
        self.kv_layout = KVBlockLayout(len(self.local_layers), kv_heads, head_size,
                                       cc.block_size, self.kv_cache_dtype)
        max_blocks_per_req = -(-self.max_model_len // cc.block_size)
        self.vocab_size = config.model_spec.vocab_size
        self.input_batch = InputBatch(
            config.scheduler_config.max_num_seqs, self.max_model_len, max_blocks_per_req,
            self.vocab_size, self.device,
        )
        # Structured outputs' logit masking is the platform's op (SDK default: tensor ops).
        self.sampler = Sampler(apply_token_bitmask=platform.apply_token_bitmask)
        from backplane.plugins import get_logits_processors

        self.logits_processors = tuple(get_logits_processors())
        # Speculative decoding: a draft model's KV blocks are sized with the target's.
        self.proposer = None
        sizing_layout = self.kv_layout
        if config.speculative_config is not None:
            from backplane.core.spec_decode.proposer import Proposer

            self.proposer = Proposer(config.speculative_config, self)
            if self.proposer.model_drafter is not None:
                sizing_layout = _CombinedLayout(
                    cc.block_size, self.kv_layout.bytes_per_block
                    + self.proposer.model_drafter.bytes_per_block)
        self.graph_sizes = self._graph_sizes(config, platform, backend_cls)
        piecewise_sizes = self._piecewise_sizes(config, platform)
        # Graph memory is held back before the KV cache takes its share of what is free.
        dims = (getattr(mc.hf_config, "hidden_size", 0),
                getattr(mc.hf_config, "intermediate_size", 0) or 0, self.dtype)
        reserves = (estimate_graph_memory(self.graph_sizes, *dims),
                    estimate_graph_memory(piecewise_sizes, *dims, pools=num_layers + 1))
        graph_reserve = sum(reserves)
        self.num_blocks = determine_num_blocks(
            sizing_layout,
            num_kv_blocks=cc.num_kv_blocks,
            kv_cache_memory_bytes=cc.kv_cache_memory_bytes,
            memory_utilization=cc.memory_utilization,
            available_memory=max(0, self._memory_share(platform) - graph_reserve),
            max_model_len=self.max_model_len,
            max_num_seqs=config.scheduler_config.max_num_seqs,
        )
        # One block id means the same tokens on every rank: all ranks use the smallest count.
        self.num_blocks = self._agreed(self.num_blocks)
        # Zero-filled (the backend decides how the memory is obtained): attention reads
        # whole blocks and masks the tail, and masked garbage (NaN * 0) would still
        # poison the output.
        cache_shape = backend_cls.kv_cache_shape(self.num_blocks, cc.block_size, kv_heads, head_size)
        self.kv_caches = [
            backend_cls.allocate_kv_cache(cache_shape, self.kv_cache_dtype, self.device)
            if layer in self.local_layers else torch.empty(0, device=self.device)
            for layer in range(num_layers)
        ]
        self.kv_scales = self._init_kv_scales(config, num_layers)
        self.kv_cache_bytes = self.num_blocks * sizing_layout.bytes_per_block
        if self.proposer is not None and self.proposer.model_drafter is not None:
            self.proposer.model_drafter.allocate_kv_cache(self.num_blocks)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s), attention backend %s",
            self.num_blocks, cc.block_size, self.num_blocks * cc.block_size,
            self.kv_cache_bytes / 2**20, str(self.kv_cache_dtype).removeprefix("torch."),
            backend_cls.name,
        )
        self._capture_graphs(platform, max_blocks_per_req, piecewise_sizes, reserves)
        # Set only now, so that capture's dummy steps never calibrate (nor record the
        # calibration): the first real step run eagerly does, and clears the flag.
        self._calibrate_kv_scales = self.kv_scales is not None and cc.calculate_kv_scales

    def _capture_graphs(self, platform: Platform, max_blocks_per_req: int,
                        piecewise_sizes: list[int], reserves: tuple[int, int]) -> None:
        """Record the decode graphs and the piecewise graphs the configuration asks for,
        warning when they took more memory than was held back for them."""
        self.decode_graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None
        measured = [None, None]
        if self.graph_sizes:
            self.decode_graphs = DecodeGraphs(
                platform.make_graph_runner(), self.graph_sizes, self._run_model,
                max_blocks_per_req=max_blocks_per_req, max_model_len=self.max_model_len,
                device=self.device,
            )
            with torch.inference_mode():
                self.decode_graphs.capture(self._free_device_memory)
            measured[0] = self.decode_graphs.capture_memory_bytes
        if piecewise_sizes:
            # Traced from the uncompiled model: the pieces are recorded by the platform.
            self.piecewise = PiecewiseGraphs(
                platform.make_graph_runner, piecewise_sizes,
                lambda ids, positions: self.base_model(ids, positions, None), self.device)
            try:
                with torch.inference_mode():
                    self.piecewise.capture()
                measured[1] = self.piecewise.memory_bytes()
            except Exception as exc:  # noqa: BLE001 - a layer make_fx cannot trace
                logger.warning("piecewise graphs are off: recording the model in pieces "
                               "failed (%s: %s); steps no decode graph covers run eagerly",
                               type(exc).__name__, exc)
                self.piecewise = None
        for kind, took, reserve in zip(("decode", "piecewise"), measured, reserves, strict=True):
            if reserve and (took or 0) > reserve:
                logger.warning(
                    "%s graphs took %.1f MiB, more than the %.1f MiB held back for them "
                    "before sizing the KV cache; lower memory_utilization if memory runs "
                    "short", kind, took / 2**20, reserve / 2**20)

    def _init_kv_scales(self, config: ResolvedConfig, num_layers: int) -> KVScales | None:
        """The fp8 cache's per-layer K/V scales (kv_scales.py); None for an unquantized cache."""
        cc = config.cache_config
        self._calibrate_kv_scales = False  # turned on after graph capture (see __init__)
        if not is_fp8_kv_cache(cc.kv_cache_dtype):
            return None
        from backplane.core.loader.weights import resolve_model_dir, safetensors_files

        scales = KVScales(num_layers, self.kv_cache_dtype, self.device)
        scales.load_checkpoint(safetensors_files(resolve_model_dir(config.model_config.model)))
        logger.info("%s%s", scales.describe(), "; recalculated from the first step's keys and "
                    "values (calculate_kv_scales)" if cc.calculate_kv_scales else "")
        return scales

    def _memory_share(self, platform: Platform) -> int:
        """Free device memory this rank may size its KV cache from: all of it, or its share
        when local ranks share one device (the cpu's host memory)."""
        local = self.parallel.local_world_size
        sharing = -(-local // max(1, platform.runtime.device_count()))
        return platform.runtime.available_memory(self.device.index or 0) // sharing

    def _communication_seconds(self) -> float:
        """Time this rank has spent in collectives so far."""
        p = self.parallel
        return p.world.seconds + p.tp.seconds + p.pp.seconds

    def _agreed(self, value: int) -> int:
        """The minimum of ``value`` over every rank (the value itself in a one-rank world)."""
        if self.world.size == 1:
            return value
        values = self.world.all_gather(torch.tensor([value], dtype=torch.int64,
                                                    device=self.device), dim=0)
        return int(values.min())

    def _share_sampled(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rank 0's sampled tokens on every rank of its tensor-parallel group.

        Only rank 0 holds the structured-output matchers and its draws decide; the
        other ranks holding the embedding (stage 0's tensor-parallel group) write
        the same tokens into their batch so that the next step's inputs agree.
        Later pipeline stages need no tokens, and are not waited for: they may be
        busy with another batch in flight. Under torchrun (SPMD) every rank runs a
        scheduler of its own, so every rank takes the tokens.
        """
        group = self.world if self.every_rank_schedules else self.parallel.tp
        if group.size == 1:
            return token_ids
        shared = token_ids.to(torch.int64).contiguous()
        return group.broadcast(shared, src=0)

    def _free_device_memory(self) -> int:
        self.platform.runtime.synchronize()
        return self.platform.runtime.available_memory()

    def _graph_sizes(self, config: ResolvedConfig, platform: Platform, backend_cls) -> list[int]:
        """Batch sizes whose decode step is recorded; empty when steps run without graphs.

        Says at start-up why graphs are off when the configuration asked for them.
        """
        comp = config.compilation_config
        if not comp.use_graphs:
            return []
        reason = self._graph_blocker(config, platform)
        if reason is None and not backend_cls.supports_graph_capture:
            reason = (f"attention backend {backend_cls.name!r} does not declare "
                      "supports_graph_capture (its per-step metadata needs the host)")
        return _usable_sizes("decode", comp.graph_capture_sizes, "max_num_seqs",
                             config.scheduler_config.max_num_seqs, reason,
                             config.optimization_level)

    def _piecewise_sizes(self, config: ResolvedConfig, platform: Platform) -> list[int]:
        """Token counts whose forward is recorded in pieces (O3); empty when off, saying
        why at start-up when the configuration asked for them."""
        comp = config.compilation_config
        if not comp.piecewise_graphs:
            return []
        return _usable_sizes("piecewise", comp.piecewise_capture_sizes,
                             "max_num_batched_tokens",
                             config.scheduler_config.max_num_batched_tokens,
                             self._graph_blocker(config, platform), config.optimization_level)

    def _graph_blocker(self, config: ResolvedConfig, platform: Platform) -> str | None:
        """Why no step of this engine can be recorded (decode or piecewise graphs); None
        when steps can be."""
        if config.speculative_config is not None:
            return ("speculative decoding verifies k + 1 tokens per request and its drafter "
                    "reads hidden states the recorded steps do not keep")
        if config.lora_config is not None:
            return "LoRA adapters are mixed per step (which tokens use which slot changes)"
        if self.world.size > 1:
            return ("the model is split over ranks (tensor/pipeline parallel); collectives "
                    "inside recorded graphs are not supported yet")
        if not platform.supports_graph_capture:
            return f"platform {platform.name!r} offers no graph runner"
        return None

    def _init_layer_backends(self, model, backend_cls, spec) -> None:
        """One backend instance per distinct layer spec, when the model's layers differ.

        The backend class was selected for the model-wide ``spec``; each layer spec
        must be one it serves too (the model only drops features per layer).
        """
        self.layer_backends = None
        self.distinct_layer_backends = [self.attn_backend]
        per_layer = getattr(model, "layer_attention_specs", None)  # CausalLM's, SDK-free
        layer_specs = per_layer(spec) if per_layer is not None else []
        if all(s == spec for s in layer_specs):
            return
        instances = {spec: self.attn_backend}
        for layer_spec in layer_specs:
            if layer_spec in instances:
                continue
            reasons = backend_cls.unsupported_reasons(layer_spec)
            if reasons:
                raise ValueError(
                    f"attention backend {backend_cls.name} cannot serve a layer spec of "
                    f"{type(model).__name__} ({layer_spec}): {'; '.join(reasons)}")
            instances[layer_spec] = backend_cls(layer_spec)
        self.layer_backends = [instances[s] for s in layer_specs]
        self.distinct_layer_backends = list(dict.fromkeys(self.layer_backends))
        logger.info("attention: %d distinct layer specs, one %s instance each",
                    len(self.distinct_layer_backends), backend_cls.name)

    @staticmethod
    def _maybe_compile(model, config: ResolvedConfig, platform: Platform):
        """torch.compile the model at O1+ (the attention layers stay eager, see Attention)."""
        comp = config.compilation_config
        if not comp.compile:
            return model
        backend = comp.backend or platform.compile_backend
        if backend is None:
            raise ValueError(
                f"compilation was requested but platform {platform.name!r} names no "
                "torch.compile backend; use optimization level O0"
            )
        # One compiled graph per decoder layer piece: allow as many recompiles as
        # there are layers, with dynamic token counts so shapes do not add more.
        import torch._dynamo

        num_layers = config.model_spec.num_layers
        torch._dynamo.config.cache_size_limit = max(
            torch._dynamo.config.cache_size_limit, 2 * num_layers + 8
        )
        logger.info("compiling the model with torch.compile(backend=%r, dynamic=True)", backend)
        return torch.compile(model, backend=backend, dynamic=True)

    # ------------------------------------------------------------ batch update
    def _update_batch(self, out: SchedulerOutput) -> None:
        batch = self.input_batch
        if self.lora is not None:
            for req_id in out.removed_request_ids:
                row = batch.req_id_to_row.get(req_id)
                if row is not None and batch.lora_slots[row] >= 0:
                    self.lora.release(int(batch.lora_slots[row]))
        batch.remove(out.removed_request_ids)
        if self.proposer is not None:
            self.proposer.forget(out.removed_request_ids)
        for cached in out.cached_requests:
            row = batch.req_id_to_row[cached.request_id]
            batch.append_blocks(row, cached.new_block_ids)
            batch.num_computed[row] = cached.num_computed_tokens
        for new in out.new_requests:
            batch.add(new.request_id, new.token_ids, new.num_prompt_tokens,
                      new.num_computed_tokens, new.block_ids, new.params, grammar=new.grammar)
            if new.lora_key is not None:
                batch.lora_slots[batch.req_id_to_row[new.request_id]] = self.lora.acquire(
                    new.lora_key, new.lora_weights)
        for req_id, drafts in out.scheduled_spec_tokens.items():
            # Drafts sit after the known tokens (not counted in num_tokens) so the
            # step gathers its inputs in one indexing op; accepted ones stay.
            row = batch.req_id_to_row[req_id]
            start = batch.num_tokens[row]
            batch.token_ids[row, start : start + len(drafts)] = drafts

    # ---------------------------------------------------------------- execute
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step to the end: `launch` then `collect`."""
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Update the batch and start the step's forward.

        Without a pipeline the forward is done on return. On pipeline stage 0 the
        activations are still in the later stages: the next `launch` may start
        another batch (of other requests) before this one is collected, and
        `collect` takes the batches back in launch order.
        """
        step = LaunchedStep(self._communication_seconds())
        self._update_batch(out)
        if out.is_empty:
            return step
        batch = self.input_batch
        n = batch.num_reqs
        counts = np.zeros(n, dtype=np.int64)
        drafts = np.zeros(n, dtype=np.int64)
        for req_id, num in out.num_scheduled_tokens.items():
            counts[batch.req_id_to_row[req_id]] = num
        for req_id, tokens in out.scheduled_spec_tokens.items():
            drafts[batch.req_id_to_row[req_id]] = len(tokens)
        rows = np.nonzero(counts)[0]
        if self.lora is not None:
            # Rows of one adapter next to each other: each slot's tokens are one run,
            # which the LoRA op handles with row slices instead of gathers.
            rows = rows[np.argsort(batch.lora_slots[rows], kind="stable")]
        computed = batch.num_computed[rows]
        flat = FlatBatch.build(rows, computed, counts[rows], batch.block_table, self.block_size)
        input_ids = batch.token_ids[flat.token_rows, flat.positions]

        device = self.device
        graph_size = (self.decode_graphs.padded_size(len(rows))
                      if self.decode_graphs is not None and int(flat.counts.max()) == 1 else None)
        piece_size = (self.piecewise.padded_size(len(input_ids))
                      if graph_size is None and self.piecewise is not None else None)
        start = time.perf_counter()
        if graph_size is not None:
            # Uniform decode: replay the recorded step over the static buffers.
            max_blocks = int(-(-flat.seq_lens.max() // self.block_size))
            hidden = self.decode_graphs.replay(
                graph_size, input_ids, flat.positions, flat.slots, flat.seq_lens.astype(np.int32),
                batch.block_table[rows, :max_blocks])
        elif piece_size is not None:
            # Any other batch (O3): the recorded pieces, attention eager between them.
            common = flat.attention_metadata(batch.block_table, self.block_size, device)
            hidden = self.piecewise.run(piece_size, input_ids, flat.positions,
                                        self._attention_context(common))
        else:
            common = flat.attention_metadata(batch.block_table, self.block_size, device)
            if self.lora is not None:
                self.lora.begin_step(batch.lora_slots[flat.token_rows])
            try:
                # None on pipeline stage 0: the output comes back in `collect`.
                hidden = self._run_model(torch.from_numpy(input_ids).to(device),
                                         torch.from_numpy(flat.positions).to(device), common)
            finally:
                if self.lora is not None:
                    self.lora.end_step()
        self.platform.runtime.synchronize()
        step.forward_seconds = time.perf_counter() - start
        step.hidden, step.flat, step.computed, step.drafts = hidden, flat, computed, drafts[rows]
        step.rows, step.removals = rows, batch.removals
        if self.parallel.pp.size > 1:
            # Batches launched before this one is collected may remove rows (moving
            # others): keep what finds them again (see _rows_after_removals).
            step.req_ids = [batch.req_ids[r] for r in rows.tolist()]
            step.params = [batch.params[r] for r in rows.tolist()]
        # Rows whose every known token is now computed produce sampled tokens (drafts
        # sit past the known tokens: batch.num_tokens does not count them).
        step.sample_mask = flat.seq_lens >= batch.num_tokens[rows]
        # Counted as computed now, so that a batch launched before this one is
        # collected reads the right positions (rejected drafts are taken back later).
        batch.num_computed[rows] = flat.seq_lens
        return step

    @torch.inference_mode()
    def collect(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Finish a launched step (the oldest one not collected yet): receive its
        activations on pipeline stage 0, sample, and return the results."""
        result = ModelRunnerOutput(forward_seconds=step.forward_seconds)
        if step.flat is not None:
            self._finish(step, result)
        result.comm_seconds = self._communication_seconds() - step.comm_start
        return result

    def _finish(self, step: LaunchedStep, result: ModelRunnerOutput) -> None:
        batch, flat = self.input_batch, step.flat
        hidden = step.hidden
        if hidden is None:
            start = time.perf_counter()
            hidden = self.base_model.receive_pipeline_output(int(flat.cu[-1]), self.device)
            self.platform.runtime.synchronize()
            result.forward_seconds += time.perf_counter() - start
        rows, computed, drafts = step.rows, step.computed, step.drafts
        counts, cu, starts, sample_mask = flat.counts, flat.cu, flat.starts, step.sample_mask
        if batch.removals != step.removals:
            # Rows were removed since the launch (a batch launched after this one, in a
            # pipeline): find the rows again; a request aborted meanwhile is skipped.
            keep, rows = self._rows_after_removals(step)
            computed, drafts, sample_mask = computed[keep], drafts[keep], sample_mask[keep]
            counts, cu, starts = counts[keep], cu[keep], starts[keep]
        self._prompt_logprobs(rows, computed, counts, starts, hidden, result)
        num_rejected = np.zeros(len(rows), dtype=np.int64)
        if sample_mask.any():
            if drafts.any():
                num_rejected[sample_mask] = self._verify(
                    rows[sample_mask], cu[sample_mask], drafts[sample_mask], hidden, result)
            else:
                self._sample(rows[sample_mask], cu[sample_mask], hidden, result)
        batch.num_computed[rows] -= num_rejected
        if self.proposer is not None:
            self.proposer.propose(flat, computed, sample_mask, hidden, result)

    def _rows_after_removals(self, step: LaunchedStep) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the step's rows still present, their current rows). A row counts as
        the same request only if it holds the same params object as at the launch,
        so a new request reusing an aborted one's id is not mistaken for it."""
        batch = self.input_batch
        keep = np.zeros(len(step.rows), dtype=bool)
        rows = np.zeros(len(step.rows), dtype=np.int64)
        for i, (req_id, params) in enumerate(zip(step.req_ids, step.params, strict=True)):
            row = batch.req_id_to_row.get(req_id)
            if row is not None and batch.params[row] is params:
                keep[i], rows[i] = True, row
        return keep, rows[keep]

    def _sample(self, sample_rows: np.ndarray, cu: np.ndarray, hidden: torch.Tensor,
                result: ModelRunnerOutput) -> None:
        """One new token for each row that reached its sampling point."""
        batch = self.input_batch
        if not self.holds_logits:
            if not self.every_rank_schedules:
                # A later pipeline stage has no head and never reads token ids (its
                # input is the previous stage's activations): it only counts the token.
                batch.num_tokens[sample_rows] += 1
                return
            # Its own scheduler (torchrun SPMD) needs rank 0's tokens to plan the same steps.
            token_ids = self._share_sampled(torch.empty(
                len(sample_rows), dtype=torch.int64, device=self.device)).tolist()
            for i, row in enumerate(sample_rows.tolist()):
                result.sampled[batch.req_ids[row]] = [token_ids[i]]
            positions = batch.num_tokens[sample_rows]
            batch.token_ids[sample_rows, positions] = token_ids
            batch.num_tokens[sample_rows] = positions + 1
            return
        logits = self.model.compute_logits(hidden[torch.from_numpy(cu - 1).to(self.device)])
        mask_start = time.perf_counter()
        grammar_bitmask, grammar_rows = self._grammar_bitmask(sample_rows)
        if grammar_bitmask is not None:
            result.grammar_mask_seconds = time.perf_counter() - mask_start
        meta = self._sampling_metadata(sample_rows, grammar_bitmask, grammar_rows)
        sampled = self.sampler(logits, meta)
        token_ids = self._share_sampled(sampled.token_ids).tolist()
        for i, row in enumerate(sample_rows.tolist()):
            result.sampled[batch.req_ids[row]] = [token_ids[i]]
        positions = batch.num_tokens[sample_rows]
        batch.token_ids[sample_rows, positions] = token_ids
        batch.num_tokens[sample_rows] = positions + 1
        if grammar_rows is not None:
            self._advance_grammars(sample_rows, grammar_rows, [[t] for t in token_ids], result)
        if sampled.logprobs is not None:
            self._collect_logprobs(sample_rows, sampled, result)

    def _verify(self, sample_rows: np.ndarray, cu: np.ndarray, drafts: np.ndarray,
                hidden: torch.Tensor, result: ModelRunnerOutput) -> np.ndarray:
        """Verify each row's draft tokens against the target; returns rejected counts.

        Row i's last ``drafts[i] + 1`` query positions give the target's
        distributions after its last known token and after each draft; rejection
        sampling keeps the longest acceptable prefix of the drafts plus one token
        drawn from the target, so the output is what decoding one token at a time
        would produce (greedy) or has its distribution (sampling).
        """
        batch = self.input_batch
        device = self.device
        num_pos = drafts + 1
        pos_cu = np.cumsum(num_pos)
        pos_starts = pos_cu - num_pos
        row_of_pos = np.repeat(np.arange(len(sample_rows)), num_pos)
        within = np.arange(int(pos_cu[-1])) - pos_starts[row_of_pos]
        flat_index = (cu - num_pos)[row_of_pos] + within
        logits = self.model.compute_logits(hidden[torch.from_numpy(flat_index).to(device)])
        mask_start = time.perf_counter()
        grammar_bitmask, grammar_positions, grammar_rows = self._draft_grammar_bitmask(
            sample_rows, drafts, pos_starts)
        if grammar_bitmask is not None:
            result.grammar_mask_seconds = time.perf_counter() - mask_start
        meta = self._sampling_metadata(sample_rows[row_of_pos], grammar_bitmask,
                                       grammar_positions, offsets=within)
        processed = self.sampler.process_logits(logits, meta)
        target_argmax = argmax_rows(processed)
        target_probs = processed  # greedy rows decide on the argmax alone
        if not meta.all_greedy:
            # Acceptance compares probabilities: normalise after top-k/top-p truncation.
            target_probs = Sampler.probs(processed, meta)
            target_probs = target_probs / target_probs.sum(dim=-1, keepdim=True)
        req_ids = [batch.req_ids[r] for r in sample_rows.tolist()]
        # The drafts sit right after each row's known tokens (see _update_batch).
        draft_rows = np.repeat(sample_rows, drafts)
        draft_ids = batch.token_ids[draft_rows, np.repeat(batch.num_tokens[sample_rows], drafts)
                                    + (np.arange(int(drafts.sum()))
                                       - np.repeat(np.cumsum(drafts) - drafts, drafts))]
        draft_probs = self.proposer.draft_probs(req_ids, drafts, meta.all_greedy)
        generators = None
        if meta.generators:
            generators = {}
            for index, generator in meta.generators.items():
                generators.setdefault(int(row_of_pos[index]), []).append(generator)
        outcome = rejection_sample(
            target_probs, target_argmax, torch.from_numpy(draft_ids).to(device),
            torch.from_numpy(drafts).to(device), draft_probs,
            torch.from_numpy(batch.greedy[sample_rows]).to(device), generators)
        tokens = outcome.token_ids.cpu().numpy()
        num_accepted = outcome.num_accepted.cpu().numpy()
        num_new = num_accepted + 1
        # Accepted tokens overwrite the drafts in the batch, then the row grows.
        new_rows = np.repeat(sample_rows, num_new)
        new_index = np.arange(int(num_new.sum())) - np.repeat(np.cumsum(num_new) - num_new,
                                                              num_new)
        first = batch.num_tokens[sample_rows]
        batch.token_ids[new_rows, np.repeat(first, num_new) + new_index] = tokens[
            np.repeat(np.arange(len(sample_rows)), num_new), new_index]
        batch.num_tokens[sample_rows] = first + num_new
        for i, req_id in enumerate(req_ids):
            result.sampled[req_id] = tokens[i, : num_new[i]].tolist()
        if grammar_rows is not None:
            self._advance_grammars(sample_rows, grammar_rows,
                                   [result.sampled[req_id] for req_id in req_ids], result)
        if meta.max_num_logprobs is not None:
            kept = torch.from_numpy(pos_starts[np.repeat(np.arange(len(sample_rows)), num_new)]
                                    + new_index).to(device)
            chosen = torch.from_numpy(tokens[np.repeat(np.arange(len(sample_rows)), num_new),
                                             new_index]).to(device)
            raw = torch.log_softmax(logits[kept].float(), dim=-1)
            ids, lps, ranks = gather_logprobs(raw, meta.max_num_logprobs, chosen)
            ids, lps, ranks = ids.cpu().numpy(), lps.cpu().numpy(), ranks.cpu().numpy()
            out_cu = np.concatenate(([0], np.cumsum(num_new)))
            for i, row in enumerate(sample_rows.tolist()):
                k = batch.params[row].logprobs
                if k is not None:
                    lo, hi = out_cu[i], out_cu[i + 1]
                    result.logprobs[req_ids[i]] = TokenLogprobs(
                        ids[lo:hi, : 1 + k], lps[lo:hi, : 1 + k], ranks[lo:hi])
        return drafts - num_accepted

    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor,
                   common: CommonAttentionMetadata) -> torch.Tensor:
        """The model forward for the step ``common`` describes (eager, or being recorded)."""
        return self.model(input_ids, positions, self._attention_context(common))

    def _attention_context(self, common: CommonAttentionMetadata) -> AttentionContext:
        """What every attention layer reads for the step ``common`` describes."""
        ctx = AttentionContext(self.attn_backend, self.attn_backend.build_metadata(common),
                               self.kv_caches)
        if self.kv_scales is not None:
            ctx.kv_scales = self.kv_scales.layers
            if self._calibrate_kv_scales and common.num_actual_tokens:
                n, scales = common.num_actual_tokens, self.kv_scales
                ctx.observe_kv_scales = lambda i, k, v: scales.observe(i, k[:n], v[:n])
                self._calibrate_kv_scales = False
        if self.layer_backends is not None:
            # One metadata per distinct layer spec, shared by that spec's layers.
            built = {id(b): ctx.metadata if b is self.attn_backend else b.build_metadata(common)
                     for b in self.distinct_layer_backends}
            ctx.layer_backends = self.layer_backends
            ctx.layer_metadata = [built[id(b)] for b in self.layer_backends]
        return ctx

    # --------------------------------------------------------------- sampling
    def _grammar_bitmask(self, rows: np.ndarray):
        """(bitmask [k, words], row indices [k]) for the constrained rows; None when none is."""
        if not any(self.input_batch.grammars):
            return None, None  # the common step: no constrained request in the batch
        grammars = [self.input_batch.grammars[r] for r in rows.tolist()]
        constrained = [i for i, g in enumerate(grammars) if g is not None]
        if not constrained:
            return None, None
        from backplane.core.structured_outputs import bitmask_width

        # Filled on the host by the grammar backends, moved once, applied in one op.
        bitmask = torch.full((len(constrained), bitmask_width(self.vocab_size)), -1,
                             dtype=torch.int32)
        for k, i in enumerate(constrained):
            grammar = grammars[i]
            if not grammar.is_terminated():
                grammar.fill_bitmask(bitmask, k)
        return bitmask.to(self.device), constrained

    def _draft_grammar_bitmask(self, rows: np.ndarray, drafts: np.ndarray,
                               pos_starts: np.ndarray):
        """Bitmasks of every position a step verifies, for the constrained rows.

        Position j of a row is masked by the grammar's state after the row's first
        j drafts: the matcher walks through the drafts it accepts, then rolls back.
        Positions after a draft the grammar refuses keep an all-allowed mask: that
        draft has probability 0 under its own mask, so it is rejected and nothing
        after it is ever used.

        Returns:
            (bitmask [positions, words] on the device, the positions' indices in
            the verification batch, the constrained rows' indices in ``rows``), or
            three Nones when no row is constrained.
        """
        batch = self.input_batch
        if not any(batch.grammars):
            return None, None, None
        row_list = rows.tolist()
        constrained = [i for i, r in enumerate(row_list) if batch.grammars[r] is not None]
        if not constrained:
            return None, None, None
        from backplane.core.structured_outputs import bitmask_width

        positions = [int(pos_starts[i]) + j for i in constrained for j in range(drafts[i] + 1)]
        bitmask = torch.full((len(positions), bitmask_width(self.vocab_size)), -1,
                             dtype=torch.int32)
        index = 0
        for i in constrained:
            row, count = row_list[i], int(drafts[i])
            grammar = batch.grammars[row]
            start = batch.num_tokens[row]
            walked = 0
            for j in range(count + 1):
                if j == walked and not grammar.is_terminated():
                    grammar.fill_bitmask(bitmask, index + j)
                    if j < count and grammar.accept_tokens([int(batch.token_ids[row, start + j])]):
                        walked += 1
            grammar.rollback(walked)
            index += count + 1
        return bitmask.to(self.device), positions, constrained

    def _advance_grammars(self, rows: np.ndarray, constrained: list[int],
                          token_lists: list[list[int]], result: ModelRunnerOutput) -> None:
        """Feed each constrained row its new tokens; note the grammars that ended.

        A grammar that ends before a row's last new token (speculative decoding's
        token after an accepted final draft) cuts the row's tokens there.
        """
        batch = self.input_batch
        for i in constrained:
            row = int(rows[i])
            grammar = batch.grammars[row]
            if grammar.is_terminated():
                continue
            req_id, tokens = batch.req_ids[row], token_lists[i]
            for count, token in enumerate(tokens, start=1):
                if not grammar.accept_tokens([token]):
                    # Cannot happen with the mask applied; say so rather than derail silently.
                    logger.error("request %s: sampled token %d is not accepted by its grammar",
                                 req_id, token)
                    result.grammar_finished.add(req_id)
                    break
                if grammar.is_terminated():
                    result.grammar_finished.add(req_id)
                    if count < len(tokens):
                        result.sampled[req_id] = tokens[:count]
                        batch.num_tokens[row] -= len(tokens) - count
                    break

    def _sampling_metadata(self, rows: np.ndarray, grammar_bitmask: torch.Tensor | None,
                           grammar_rows: list[int] | None,
                           offsets: np.ndarray | None = None) -> SamplingMetadata:
        """Per-entry sampling inputs; entry i samples row ``rows[i]``'s next token.

        ``offsets[i]`` (speculative decoding) makes entry i the position after the
        row's first ``offsets[i]`` drafts, which sit right after its known tokens in
        the batch: history-dependent settings (penalties, bad words, min_tokens,
        logits processors, seeds) then see those drafts as output, exactly as
        decoding them one at a time would.
        """
        batch = self.input_batch
        # Tokens each entry's history holds (known tokens, plus drafts before it).
        ends = batch.num_tokens[rows] + (0 if offsets is None else offsets)
        params = [batch.params[r] for r in rows.tolist()]
        greedy = batch.greedy[rows]
        all_greedy = bool(greedy.all())

        def column(attr: str, neutral):
            values = [getattr(p, attr) for p in params]
            return None if all(v == neutral for v in values) else values

        top_k, top_p, min_p = column("top_k", 0), column("top_p", 1.0), column("min_p", 0.0)
        presence = column("presence_penalty", 0.0)
        frequency = column("frequency_penalty", 0.0)
        repetition = column("repetition_penalty", 1.0)
        counts = seen = None
        if presence or frequency or repetition:
            counts, seen = self._token_statistics(rows, ends, need_seen=repetition is not None)
        bias = [p.logit_bias for p in params]
        banned = None
        allowed = None
        row_list = rows.tolist()
        # Only rows with min_tokens, bad words or an allowed set need per-row work;
        # the common case builds nothing.
        special = [
            i for i, p in enumerate(params)
            if p.min_tokens or p.bad_words_token_ids or p.allowed_token_ids is not None
        ]
        for i in special:
            p, row, end = params[i], row_list[i], int(ends[i])
            forbid: set[int] = set()
            if end - batch.num_prompt_tokens[row] < p.min_tokens:
                # EOS is banned even with ignore_eos, as vLLM does: min_tokens promises
                # that many tokens of real output, not EOS tokens that fail to stop.
                forbid |= p.all_stop_token_ids | p.eos_token_ids
            if p.bad_words_token_ids:
                output = batch.token_ids[row, batch.num_prompt_tokens[row] : end]
                forbid |= _bad_word_completions(p.bad_words_token_ids, output)
            if forbid:
                banned = banned or [[] for _ in params]
                banned[i] = sorted(forbid)
            if p.allowed_token_ids is not None:
                if allowed is None:
                    allowed = torch.ones(len(params), self.vocab_size, dtype=torch.bool)
                allowed[i] = False
                allowed[i, p.allowed_token_ids] = True
        generators = batch.generators(row_list, None if offsets is None else offsets.tolist())
        max_logprobs = [p.logprobs for p in params if p.logprobs is not None]

        def as_tensor(values, dtype):
            return None if values is None else torch.tensor(values, dtype=dtype,
                                                            device=self.device)

        output_token_ids = None
        if self.logits_processors:
            output_token_ids = [
                batch.token_ids[r, batch.num_prompt_tokens[r] : end].tolist()
                for r, end in zip(rows.tolist(), ends.tolist(), strict=True)
            ]
        return SamplingMetadata(
            grammar_bitmask=grammar_bitmask,
            grammar_rows=grammar_rows,
            logits_processors=self.logits_processors,
            output_token_ids=output_token_ids,
            all_greedy=all_greedy,
            temperature=torch.from_numpy(batch.temperature[rows]).to(self.device),
            greedy_mask=None if not greedy.any() else torch.from_numpy(greedy).to(self.device),
            top_k=as_tensor(top_k, torch.int64),
            top_p=as_tensor(top_p, torch.float32),
            min_p=as_tensor(min_p, torch.float32),
            presence_penalty=as_tensor(presence, torch.float32),
            frequency_penalty=as_tensor(frequency, torch.float32),
            repetition_penalty=as_tensor(repetition, torch.float32),
            output_token_counts=counts,
            seen_token_mask=seen,
            logit_bias=bias if any(bias) else None,
            banned_token_ids=banned,
            allowed_token_mask=None if allowed is None else allowed.to(self.device),
            generators=generators,
            max_num_logprobs=max(max_logprobs) if max_logprobs else None,
        )

    def _token_statistics(self, rows: np.ndarray, ends: np.ndarray, need_seen: bool):
        """Output-token counts [B, V] and (optionally) a prompt-or-output seen mask [B, V]
        of each entry's history (row ``rows[i]``'s first ``ends[i]`` tokens)."""
        batch = self.input_batch
        counts = torch.zeros(len(rows), self.vocab_size, dtype=torch.float32)
        seen = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool) if need_seen else None
        # Built on the host (cheap scatter of small index lists), moved once.
        for i, (row, total) in enumerate(zip(rows.tolist(), ends.tolist(), strict=True)):
            prompt_len = batch.num_prompt_tokens[row]
            outputs = torch.from_numpy(batch.token_ids[row, prompt_len:total])
            counts[i].index_add_(0, outputs, torch.ones(len(outputs)))
            if seen is not None:
                seen[i, torch.from_numpy(batch.token_ids[row, :total])] = True
        return counts.to(self.device), None if seen is None else seen.to(self.device)

    def _collect_logprobs(self, rows: np.ndarray, sampled, result: ModelRunnerOutput) -> None:
        batch = self.input_batch
        ids = sampled.logprob_token_ids.cpu().numpy()
        lps = sampled.logprobs.cpu().numpy()
        ranks = sampled.sampled_ranks.cpu().numpy()
        for i, row in enumerate(rows.tolist()):
            k = batch.params[row].logprobs
            if k is None:
                continue
            result.logprobs[batch.req_ids[row]] = TokenLogprobs(
                ids[i : i + 1, : 1 + k], lps[i : i + 1, : 1 + k], ranks[i : i + 1]
            )

    def _prompt_logprobs(self, rows, computed, counts, starts, hidden, result) -> None:
        """Logprob of each prompt token given the tokens before it, for rows that ask."""
        if not self.holds_logits:
            return
        batch = self.input_batch
        for i, row in enumerate(rows.tolist()):
            k = batch.params[row].prompt_logprobs
            if k is None:
                continue
            prompt_len = int(batch.num_prompt_tokens[row])
            first, last = int(computed[i]), min(int(computed[i] + counts[i]), prompt_len - 1)
            if last <= first:
                continue
            flat = torch.arange(first, last, device=self.device) - first + int(starts[i])
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[flat]).float(), dim=-1)
            targets = torch.from_numpy(batch.token_ids[row, first + 1 : last + 1]).to(self.device)
            ids, lps, ranks = gather_logprobs(logprobs, k, targets)
            chunk = TokenLogprobs(ids.cpu().numpy(), lps.cpu().numpy(), ranks.cpu().numpy())
            result.prompt_logprobs[batch.req_ids[row]] = chunk


def _usable_sizes(kind: str, requested: list[int] | None, limit_name: str, limit: int,
                  reason: str | None, level: int | None) -> list[int]:
    """The ``requested`` capture sizes up to ``limit``; none (logging why) when ``reason``
    says graphs cannot be had or no size fits."""
    sizes = [s for s in requested or () if s <= limit]
    if reason is None and not sizes:
        reason = f"no {kind} capture size is <= {limit_name} ({limit}); sizes: {requested}"
    if reason is not None:
        logger.warning("%s graphs (optimization level O%s) are off: %s; the steps they would "
                       "cover run without them", kind, level, reason)
        return []
    dropped = sorted(set(requested) - set(sizes))
    if dropped:
        logger.info("%s capture sizes %s exceed %s (%d): not captured", kind, dropped,
                    limit_name, limit)
    return sizes


def _bad_word_completions(bad_words: list[list[int]], output: np.ndarray) -> set[int]:
    """Last tokens of the bad words whose other tokens end ``output`` (to be banned now)."""
    banned = set()
    n = len(output)
    for word in bad_words:
        prefix = word[:-1]
        if len(prefix) <= n and (not prefix or output[n - len(prefix):].tolist() == prefix):
            banned.add(word[-1])
    return banned
