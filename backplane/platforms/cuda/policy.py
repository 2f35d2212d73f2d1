"""Config policy of the cuda (and rocm) platform.

Graph capture needs nothing from the policy: the config layer turns it on at
O2+ for platforms with a GraphRunner and fills the capture-size ladder.
"""

from __future__ import annotations

from backplane.plugins_sdk import ConfigDecision, ConfigPolicy, DeviceRuntime, PlatformConfigView

# Executors that keep every rank on this host, so the local GPU count bounds them.
_SINGLE_HOST_EXECUTORS = ("uni", "mp")
# kv_cache_dtype values the triton_paged backend has kernels for.
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


class CudaConfigPolicy(ConfigPolicy):
    """GPU refusals: a KV cache dtype without kernels, more local ranks than GPUs."""

    # The host CPU idles while the GPU steps: tokenization, detokenization and
    # HTTP in the front-end process overlap with the step (rocm inherits this).
    default_engine_process = True

    def __init__(self, runtime: DeviceRuntime, platform_name: str = "cuda") -> None:
        self.runtime = runtime
        self.platform_name = platform_name

    def check_and_update(self, view: PlatformConfigView) -> ConfigDecision:
        decision = ConfigDecision()
        # fp8 is up to the attention backend (triton_paged declares it, the torch
        # SDPA fallback does not, and selection says so); a cache in another float
        # dtype than the model's has no kernel.
        if view.kv_cache_dtype not in _KV_CACHE_DTYPES:
            decision.refusals.append(
                f"kv_cache_dtype {view.kv_cache_dtype!r} is not supported on the "
                f"{self.platform_name} platform; use one of {list(_KV_CACHE_DTYPES)}"
            )

        tp, pp = view.tensor_parallel_size, view.pipeline_parallel_size
        world = tp * pp
        if view.distributed_executor_backend in _SINGLE_HOST_EXECUTORS:
            visible = self.runtime.device_count()
            if world > visible:
                decision.refusals.append(
                    f"tensor_parallel_size ({tp}) x pipeline_parallel_size "
                    f"({pp}) = {world} exceeds the {visible} GPU(s) "
                    f"visible to the {self.platform_name} platform on this host"
                )
        return decision
