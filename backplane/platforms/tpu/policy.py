"""Config policy of the tpu platform."""

from __future__ import annotations

from backplane.plugins_sdk import ConfigDecision, ConfigPolicy, PlatformConfigView


class TpuConfigPolicy(ConfigPolicy):
    """TPU refusals: no quantized KV cache, no graph capture (XLA compiles traces itself)."""

    def check_and_update(self, view: PlatformConfigView) -> ConfigDecision:
        decision = ConfigDecision()
        if view.kv_cache_dtype != "auto":
            decision.refusals.append(
                f"kv_cache_dtype {view.kv_cache_dtype!r} is not supported on "
                "the tpu platform; use 'auto'"
            )
        if view.use_graphs:
            decision.refusals.append(
                "graph capture (use_graphs=True) does not apply on the tpu platform: XLA "
                "compiles and caches each traced step itself; leave use_graphs unset"
            )
        return decision
