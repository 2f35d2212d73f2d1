"""The one resolution step: user options + the chosen platform -> a frozen ResolvedConfig.

``resolve(args, platform)`` takes the user's `EngineArgs` (from the CLI, a YAML
file, ``BACKPLANE_*`` variables or keyword arguments) and the platform the
engine will run on, and returns a `ResolvedConfig`. Everything downstream
(model construction, KV sizing, the runner, the scheduler, the server) reads
that object; nothing re-derives a setting from the user's input or the HF config.

Resolution is `EngineConfig.check` (every problem listed before anything is
built: ranges, combinations, unsupported features, the platform policy's
refusals, the attention backend) followed by freezing: the sections become
read-only and the model's geometry is computed once into a `ModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

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
    StructuredOutputsConfig,
)
from backplane.config.engine import EngineConfig
from backplane.config.model_spec import ModelSpec

if TYPE_CHECKING:
    from backplane.config.engine_args import EngineArgs
    from backplane.plugins_sdk import AttentionSpec, Platform


@dataclass(frozen=True)
class ResolvedConfig:
    """A complete, validated, read-only engine configuration for one platform.

    The sections keep the names and fields of `EngineConfig`'s (frozen now);
    the resolved extras are:

    Attributes:
        model_spec: the model's geometry and defaults, computed once.
        platform_name: the platform it was resolved for.
        attention_backend_name: the attention backend selected for the model.
        decisions: every default chosen and every explicit setting that won
            over one, each with its reason (the optimization level's derived
            compilation and graph settings among them), in words.
    """

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device_config: DeviceConfig
    load_config: LoadConfig
    compilation_config: CompilationConfig
    structured_outputs_config: StructuredOutputsConfig
    lora_config: LoRAConfig | None
    speculative_config: SpeculativeConfig | None
    optimization_level: int | None
    enforce_eager: bool
    model_spec: ModelSpec
    platform_name: str
    attention_backend_name: str
    decisions: tuple[str, ...]

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output, in tokens."""
        return int(self.model_config.max_model_len)

    @property
    def notes(self) -> list[str]:
        """`decisions` as a list (the name EngineConfig uses)."""
        return list(self.decisions)

    def attention_spec(self) -> AttentionSpec:
        """The per-rank AttentionSpec the selected backend serves."""
        return self.model_spec.attention_spec()

    def compute_hash(self) -> str:
        """Stable sha256 of what changes compiled artefacts or numerics (config.hashing)."""
        from backplane.config.hashing import compute_config_hash

        return compute_config_hash(self)  # type: ignore[arg-type]


# EngineConfig fields that ResolvedConfig carries over as they are (frozen).
_SECTION_NAMES = frozenset(
    f.name for f in fields(ResolvedConfig)
    if f.name not in ("model_spec", "platform_name", "attention_backend_name", "decisions")
)


def problems(args: EngineArgs | EngineConfig, platform: Platform) -> list[str]:
    """Every problem of ``args`` on ``platform`` (empty when it resolves); builds nothing."""
    config = args if isinstance(args, EngineConfig) else args.create_engine_config()
    return config.check(platform)


def resolve(args: EngineArgs | EngineConfig, platform: Platform) -> ResolvedConfig:
    """Resolve ``args`` for ``platform``; raises one ValueError listing every problem."""
    config = args if isinstance(args, EngineConfig) else args.create_engine_config()
    config.finalize(platform)
    return freeze(config)


def freeze(config: EngineConfig) -> ResolvedConfig:
    """The ResolvedConfig of a finalized EngineConfig (its sections become read-only)."""
    if not config.finalized:
        raise ValueError("freeze() needs a finalized EngineConfig (use resolve())")
    sections: dict[str, Any] = {}
    for f in fields(EngineConfig):
        if f.name in _SECTION_NAMES:
            value = getattr(config, f.name)
            if hasattr(value, "freeze"):
                value.freeze()
            sections[f.name] = value
    return ResolvedConfig(
        **sections,
        model_spec=ModelSpec.from_config(config),
        platform_name=str(config.platform_name),
        attention_backend_name=str(config.attention_backend_name),
        decisions=tuple(config.notes),
    )
