"""EngineArgs: the flat set of user-facing options, turned into an EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from backplane.config.configs import (
    CacheConfig,
    CompilationConfig,
    DeviceConfig,
    LoadConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from backplane.config.engine import EngineConfig


@dataclass
class EngineArgs:
    """Every engine option as one flat record (what `LLM(**kwargs)` and the CLI take)."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    served_model_name: list[str] | None = None
    trust_remote_code: bool = False
    tokenizer_mode: str = "auto"
    hf_overrides: dict[str, Any] | None = None
    max_logprobs: int = 20
    revision: str | None = None
    max_seq_len_to_capture: int | None = None
    download_dir: str | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "uni"
    device: str = "auto"
    attention_backend: str | None = None
    load_format: str = "safetensors"
    optimization_level: int | None = None
    enforce_eager: bool = False
    compilation_config: dict[str, Any] | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_sources(cls, **kwargs: Any) -> EngineArgs:
        """EngineArgs from keyword arguments, a ``config=`` YAML file and BACKPLANE_* variables.

        What ``LLM(**kwargs)`` should call: unlike ``EngineArgs(**kwargs)`` it
        accepts aliases (``gpu_memory_utilization``) and deprecated names (with a
        warning), and reports unknown names with close matches.
        """
        from backplane.config.sources import engine_args_from_sources

        return engine_args_from_sources(kwargs=kwargs)

    def create_engine_config(self) -> EngineConfig:
        """Split the flat options into config sections (not yet finalized)."""
        return EngineConfig(
            model_config=ModelConfig(
                model=self.model,
                tokenizer=self.tokenizer,
                dtype=self.dtype,
                max_model_len=self.max_model_len,
                seed=self.seed,
                served_model_name=self.served_model_name,
                trust_remote_code=self.trust_remote_code,
                tokenizer_mode=self.tokenizer_mode,
                hf_overrides=dict(self.hf_overrides) if self.hf_overrides else None,
                max_logprobs=self.max_logprobs,
                revision=self.revision,
                max_seq_len_to_capture=self.max_seq_len_to_capture,
            ),
            cache_config=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                memory_utilization=self.memory_utilization,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                num_kv_blocks=self.num_kv_blocks,
                kv_cache_dtype=self.kv_cache_dtype,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                enable_chunked_prefill=self.enable_chunked_prefill,
                scheduling_policy=self.scheduling_policy,  # type: ignore[arg-type]
            ),
            parallel_config=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                pipeline_parallel_size=self.pipeline_parallel_size,
                distributed_executor_backend=self.distributed_executor_backend,
            ),
            device_config=DeviceConfig(device=self.device, attention_backend=self.attention_backend),
            load_config=LoadConfig(load_format=self.load_format, download_dir=self.download_dir),
            compilation_config=_compilation_config(self.compilation_config),
            # enforce_eager and the level are resolved together in finalize, which
            # reports a conflict between them instead of silently dropping one.
            optimization_level=self.optimization_level,
            enforce_eager=self.enforce_eager,
        )


def _compilation_config(value: dict[str, Any] | CompilationConfig | None) -> CompilationConfig:
    """CompilationConfig from the user's explicit settings (None fields = level defaults)."""
    if value is None:
        return CompilationConfig()
    if isinstance(value, CompilationConfig):
        return CompilationConfig(**{f.name: getattr(value, f.name) for f in fields(value)})
    known = {f.name for f in fields(CompilationConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"compilation_config: unknown key(s) {unknown}; known: {sorted(known)}"
        )
    return CompilationConfig(**value)
