"""The platform policy's view of an EngineConfig: built before the policy runs, copied back after.

Platforms see the configuration only through the SDK's `PlatformConfigView`
(typed fields, most read-only); this module is the one place that maps those
fields to the config sections, in both directions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backplane.config.attention_spec import head_size_of, sliding_window_of
from backplane.config.levels import default_graph_capture_sizes
from backplane.plugins_sdk import ConfigDecision, PlatformConfigView
from backplane.plugins_sdk.platform import run_config_policy

if TYPE_CHECKING:
    from backplane.config.engine import EngineConfig
    from backplane.plugins_sdk import Platform

# Writable view field -> (EngineConfig section, attribute) it is copied back to.
WRITE_BACK: dict[str, tuple[str, str]] = {
    "dtype": ("model_config", "torch_dtype"),
    "block_size": ("cache_config", "block_size"),
    "memory_utilization": ("cache_config", "memory_utilization"),
    "kv_cache_memory_bytes": ("cache_config", "kv_cache_memory_bytes"),
    "num_kv_blocks": ("cache_config", "num_kv_blocks"),
    "compile": ("compilation_config", "compile"),
    "use_graphs": ("compilation_config", "use_graphs"),
    "graph_capture_sizes": ("compilation_config", "graph_capture_sizes"),
    "attention_backend": ("device_config", "attention_backend"),
}


def _model_geometry(hf: Any, max_model_len: int | None) -> dict[str, Any]:
    """The view's model fields from the HF config (all None when it is not known)."""
    if hf is None:
        return dict.fromkeys(("architecture", "num_layers", "num_heads", "num_kv_heads",
                              "head_size", "sliding_window", "vocab_size"))
    heads = getattr(hf, "num_attention_heads", None)
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    try:
        head_size = head_size_of(hf)
    except ValueError:
        head_size = None  # reported by the attention-spec check
    architectures = getattr(hf, "architectures", None) or [type(hf).__name__]

    def number(value: Any) -> int | None:
        return int(value) if value is not None else None

    return dict(
        architecture=str(architectures[0]),
        num_layers=number(getattr(hf, "num_hidden_layers", None)),
        num_heads=number(heads),
        num_kv_heads=number(kv_heads),
        head_size=head_size,
        sliding_window=sliding_window_of(hf, max_model_len),
        vocab_size=number(getattr(hf, "vocab_size", None)),
    )


def platform_config_view(config: EngineConfig) -> PlatformConfigView:
    """The view a platform's policy gets of ``config`` (after dtype and level resolution)."""
    mc, cc, sc, pc = (config.model_config, config.cache_config, config.scheduler_config,
                      config.parallel_config)
    comp = config.compilation_config
    return PlatformConfigView(
        **_model_geometry(mc.hf_config, mc.max_model_len),
        max_model_len=mc.max_model_len,
        tensor_parallel_size=pc.tensor_parallel_size,
        pipeline_parallel_size=pc.pipeline_parallel_size,
        distributed_executor_backend=pc.distributed_executor_backend,
        max_num_seqs=sc.max_num_seqs,
        max_num_batched_tokens=sc.max_num_batched_tokens,
        optimization_level=config.optimization_level,
        compile_backend=comp.backend if comp.compile else None,
        kv_cache_dtype=cc.kv_cache_dtype,
        dtype=mc.torch_dtype,
        block_size=cc.block_size,
        memory_utilization=cc.memory_utilization,
        kv_cache_memory_bytes=cc.kv_cache_memory_bytes,
        num_kv_blocks=cc.num_kv_blocks,
        compile=bool(comp.compile),
        use_graphs=bool(comp.use_graphs),
        graph_capture_sizes=comp.graph_capture_sizes,
        attention_backend=config.device_config.attention_backend,
    )


def apply_view(view: PlatformConfigView, config: EngineConfig) -> None:
    """Copy the fields the policy changed in ``view`` back into ``config``."""
    for name, value in view.updates().items():
        section, attribute = WRITE_BACK[name]
        if isinstance(value, tuple):
            value = list(value)
        setattr(getattr(config, section), attribute, value)
    comp = config.compilation_config
    if comp.use_graphs and comp.graph_capture_sizes is None:
        comp.graph_capture_sizes = default_graph_capture_sizes(
            config.scheduler_config.max_num_seqs)


def run_platform_policy(config: EngineConfig, platform: Platform) -> ConfigDecision:
    """Run ``platform``'s ConfigPolicy on ``config`` through the view; its decision.

    A policy written for SDK 1.0 (only ``check_and_update_config``) still gets
    ``config`` itself, with a DeprecationWarning. Exceptions propagate: the
    caller reports them as a problem of the policy.
    """
    view = platform_config_view(config)
    decision = run_config_policy(platform.config_policy, view, legacy_config=config)
    apply_view(view, config)
    return decision
