"""EngineConfig: every section together, resolved against the model and platform."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from backplane.config.configs import (
    CacheConfig,
    CompilationConfig,
    DeviceConfig,
    LoadConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_dtype,
)

if TYPE_CHECKING:
    from backplane.plugins_sdk import Platform

logger = logging.getLogger(__name__)

# Step token budget when the user sets none and chunked prefill is on.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass
class EngineConfig:
    """The full, resolved configuration of one engine."""

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    load_config: LoadConfig = field(default_factory=LoadConfig)
    compilation_config: CompilationConfig = field(default_factory=CompilationConfig)
    lora_config: LoRAConfig | None = None
    speculative_config: SpeculativeConfig | None = None
    optimization_level: int | None = None

    @property
    def max_model_len(self) -> int:
        assert self.model_config.max_model_len is not None, "EngineConfig not finalized"
        return self.model_config.max_model_len

    def finalize(self, platform: Platform) -> EngineConfig:
        """Fill model-derived defaults, apply the platform's policy, then validate.

        Raises ValueError listing every problem found.
        """
        from backplane.core.loader.hf_config import load_hf_config

        mc = self.model_config
        if mc.hf_config is None:
            mc.hf_config = load_hf_config(mc.model, trust_remote_code=mc.trust_remote_code)
        mc.torch_dtype = _resolve_dtype(mc.dtype, mc.hf_config, platform)
        model_limit = getattr(mc.hf_config, "max_position_embeddings", None)
        if mc.max_model_len is None:
            if model_limit is None:
                raise ValueError(
                    "max_model_len is not set and the model config has no max_position_embeddings"
                )
            mc.max_model_len = int(model_limit)
        sc = self.scheduler_config
        if sc.max_num_batched_tokens is None:
            sc.max_num_batched_tokens = (
                max(DEFAULT_MAX_NUM_BATCHED_TOKENS, sc.max_num_seqs)
                if sc.enable_chunked_prefill
                else max(mc.max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)
            )
        decision = platform.config_policy.check_and_update_config(self)
        for change in decision.changes:
            logger.info("platform %s: %s", platform.name, change)
        problems = list(decision.refusals) + self.problems(model_limit)
        if problems:
            raise ValueError("invalid engine configuration:\n  - " + "\n  - ".join(problems))
        return self

    def problems(self, model_limit: int | None = None) -> list[str]:
        """Every inconsistency in the config, as messages saying how to fix it."""
        mc, cc, sc, pc = (
            self.model_config, self.cache_config, self.scheduler_config, self.parallel_config
        )
        out = []
        if mc.max_model_len is not None and mc.max_model_len < 1:
            out.append(f"max_model_len ({mc.max_model_len}) must be >= 1")
        if cc.block_size < 1:
            out.append(f"block_size ({cc.block_size}) must be >= 1")
        if not 0.0 < cc.memory_utilization <= 1.0:
            out.append(f"memory_utilization ({cc.memory_utilization}) must be in (0, 1]")
        if cc.num_kv_blocks is not None and cc.num_kv_blocks < 1:
            out.append(f"num_kv_blocks ({cc.num_kv_blocks}) must be >= 1")
        if sc.max_num_seqs < 1:
            out.append(f"max_num_seqs ({sc.max_num_seqs}) must be >= 1")
        if sc.scheduling_policy not in ("fcfs", "priority"):
            out.append(
                f"scheduling_policy ({sc.scheduling_policy!r}) must be 'fcfs' or 'priority'"
            )
        if sc.max_num_batched_tokens is not None:
            if sc.max_num_batched_tokens < 1:
                out.append(f"max_num_batched_tokens ({sc.max_num_batched_tokens}) must be >= 1")
            elif (
                not sc.enable_chunked_prefill
                and mc.max_model_len is not None
                and sc.max_num_batched_tokens < mc.max_model_len
            ):
                out.append(
                    f"max_num_batched_tokens ({sc.max_num_batched_tokens}) is smaller than "
                    f"max_model_len ({mc.max_model_len}) with chunked prefill disabled: a long "
                    "prompt could never be scheduled; enable chunked prefill or raise "
                    "max_num_batched_tokens"
                )
        hf = mc.hf_config
        if hf is not None and pc.tensor_parallel_size > 1:
            heads = getattr(hf, "num_attention_heads", None)
            if heads and heads % pc.tensor_parallel_size:
                out.append(
                    f"tensor_parallel_size ({pc.tensor_parallel_size}) must divide "
                    f"num_attention_heads ({heads})"
                )
        return out


def _resolve_dtype(dtype: str, hf_config, platform: Platform) -> torch.dtype:
    supported = platform.runtime.supported_dtypes
    if dtype == "auto":
        ckpt = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        resolved = parse_dtype(ckpt) if ckpt is not None else torch.float32
        if resolved not in supported:
            resolved = platform.runtime.default_dtype()
        return resolved
    resolved = parse_dtype(dtype)
    if resolved not in supported:
        names = [str(d).removeprefix("torch.") for d in supported]
        raise ValueError(
            f"dtype {dtype!r} is not supported by platform {platform.name!r}; supported: {names}"
        )
    return resolved
