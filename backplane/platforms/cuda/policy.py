"""Config policy of the cuda (and rocm) platform."""

from __future__ import annotations

from backplane.plugins_sdk import ConfigDecision, ConfigPolicy, DeviceRuntime

# Batch sizes captured as graphs when use_graphs is on and no sizes were given:
# small sizes one by one (decode batches are often tiny), then every multiple of 8.
_GRAPH_LADDER = (1, 2, 4, *range(8, 513, 8))
# Executors that keep every rank on this host, so the local GPU count bounds them.
_SINGLE_HOST_EXECUTORS = ("uni", "mp")


def default_graph_capture_sizes(max_num_seqs: int) -> list[int]:
    """The capture ladder up to (and including) ``max_num_seqs``."""
    sizes = [s for s in _GRAPH_LADDER if s < max_num_seqs]
    return sizes + [max_num_seqs]


class CudaConfigPolicy(ConfigPolicy):
    """GPU defaults and refusals: KV cache dtype, graph capture sizes, device count."""

    def __init__(self, runtime: DeviceRuntime, platform_name: str = "cuda") -> None:
        self.runtime = runtime
        self.platform_name = platform_name

    def check_and_update_config(self, config) -> ConfigDecision:
        decision = ConfigDecision()
        cc = config.cache_config
        if cc.kv_cache_dtype != "auto":
            decision.refusals.append(
                f"kv_cache_dtype {cc.kv_cache_dtype!r} is not supported on the "
                f"{self.platform_name} platform (no quantized KV cache kernels yet); use 'auto'"
            )

        comp = config.compilation_config
        if comp.use_graphs and comp.graph_capture_sizes is None:
            comp.graph_capture_sizes = default_graph_capture_sizes(
                config.scheduler_config.max_num_seqs
            )
            decision.changes.append(
                f"graph_capture_sizes defaults to {len(comp.graph_capture_sizes)} sizes "
                f"from 1 to {comp.graph_capture_sizes[-1]} (max_num_seqs)"
            )
        bad_sizes = [s for s in comp.graph_capture_sizes or [] if s < 1]
        if bad_sizes:
            decision.refusals.append(f"graph_capture_sizes {bad_sizes} must all be >= 1")

        pc = config.parallel_config
        world = pc.tensor_parallel_size * pc.pipeline_parallel_size
        if pc.distributed_executor_backend in _SINGLE_HOST_EXECUTORS:
            visible = self.runtime.device_count()
            if world > visible:
                decision.refusals.append(
                    f"tensor_parallel_size ({pc.tensor_parallel_size}) x pipeline_parallel_size "
                    f"({pc.pipeline_parallel_size}) = {world} exceeds the {visible} GPU(s) "
                    f"visible to the {self.platform_name} platform on this host"
                )
        return decision
