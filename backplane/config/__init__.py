"""Engine configuration: typed sections, EngineArgs, validation."""

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
from backplane.config.engine import EngineConfig
from backplane.config.engine_args import EngineArgs
from backplane.config.sources import engine_args_from_sources, load_yaml_config

__all__ = [
    "CacheConfig",
    "CompilationConfig",
    "DeviceConfig",
    "EngineArgs",
    "EngineConfig",
    "LoRAConfig",
    "LoadConfig",
    "ModelConfig",
    "ParallelConfig",
    "SchedulerConfig",
    "SpeculativeConfig",
    "engine_args_from_sources",
    "load_yaml_config",
    "parse_dtype",
]
