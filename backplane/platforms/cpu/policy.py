"""Config policy of the CPU platform."""

from __future__ import annotations

from backplane.plugins_sdk import ConfigDecision, ConfigPolicy, PlatformConfigView

# Like vLLM's VLLM_CPU_KVCACHE_SPACE default: host RAM is shared with everything
# else on the machine, so a fraction of "available" memory is not a safe default.
DEFAULT_CPU_KV_CACHE_BYTES = 4 * 1024**3
# kv_cache_dtype values the cpu platform has kernels for.
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


class CpuConfigPolicy(ConfigPolicy):
    """CPU defaults: a bounded KV cache, no graph capture, KV cache in the model dtype or fp8."""

    # In-process: the model already uses every core, so an engine process only
    # competes with the front-end for them and adds a message round trip per
    # step. Measured on 2 cores (tiny shape, docs/benchmarks.md, three runs each):
    # batch-1 latency 49-76 ms in-process vs 73-133 ms with an engine process;
    # throughput 8.0-9.5k vs 7.6-8.8k output tokens/s.
    default_engine_process = False

    def check_and_update(self, view: PlatformConfigView) -> ConfigDecision:
        decision = ConfigDecision()
        if (view.kv_cache_memory_bytes is None and view.num_kv_blocks is None
                and view.memory_utilization is None):
            view.kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_BYTES
            decision.changes.append(
                "kv_cache_memory_bytes defaults to 4 GiB on the CPU (set kv_cache_memory_bytes, "
                "num_kv_blocks or memory_utilization to change it)"
            )
        # fp8 is up to the attention backend (cpu_paged declares it; cpu_sdpa does
        # not, and selection says so); a cache in another float dtype than the
        # model's has no kernel.
        if view.kv_cache_dtype not in _KV_CACHE_DTYPES:
            decision.refusals.append(
                f"kv_cache_dtype {view.kv_cache_dtype!r} is not supported on the cpu platform; "
                f"use one of {list(_KV_CACHE_DTYPES)}"
            )
        if view.use_graphs:
            decision.refusals.append(
                "graph capture (use_graphs=True) is not available on the cpu platform; "
                "use optimization level O0 or O1"
            )
        return decision
