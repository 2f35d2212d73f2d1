"""Decode-step and mixed-workload figures for issue 13, in one process (GPU machine).

    python scripts/gpu_bench.py OUT_DIR MODEL_DIR [MODEL_DIR ...] [--device cuda]
        [--configs eager,graphs,graphs_async,graphs_async_proc] [--throughput]

For each model and configuration: decode step time at batch 1, 16 and 64 and
the share of the step outside the model (bench latency's figures), written to
OUT_DIR/lat_<model>_<config>.json as soon as it is measured, so a run cut short
keeps what it finished. With --throughput, the first model also runs the mixed
workload eager (with the transformers baseline in the same run) and with graphs
and async scheduling. The KV cache size is fixed (4 GiB) so that engines built
one after another in this process do not compete for memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

CONFIGS = {
    "eager": dict(optimization_level=0, async_scheduling=False, engine_process=False),
    "graphs": dict(optimization_level=2, compilation_config={"compile": False},
                   async_scheduling=False, engine_process=False),
    "graphs_async": dict(optimization_level=2, compilation_config={"compile": False},
                         async_scheduling=True, engine_process=False),
    "graphs_async_proc": dict(optimization_level=2, compilation_config={"compile": False},
                              async_scheduling=True, engine_process=True),
    "eager_async": dict(optimization_level=0, async_scheduling=True, engine_process=False),
    "eager_proc": dict(optimization_level=0, async_scheduling=False, engine_process=True),
    "eager_async_proc": dict(optimization_level=0, async_scheduling=True, engine_process=True),
    "compiled_graphs": dict(optimization_level=2, async_scheduling=False, engine_process=False),
    # O3: decode graphs plus piecewise graphs for the steps with prefill chunks.
    "piecewise": dict(optimization_level=3, compilation_config={"compile": False},
                      async_scheduling=False, engine_process=False),
}


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    from backplane.benchmarks.latency import LatencyOptions, run_latency
    from backplane.config import EngineArgs

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default="eager,graphs,graphs_async,graphs_async_proc")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--kv-bytes", type=int, default=4 * 2**30)
    parser.add_argument("--throughput", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    common = dict(device=args.device, max_model_len=1024, max_num_seqs=max(batches),
                  kv_cache_memory_bytes=args.kv_bytes)
    for model in args.models:
        name = Path(model).name
        for config in args.configs.split(","):
            begin = time.perf_counter()
            try:
                result = run_latency(LatencyOptions(
                    EngineArgs(model=model, **common, **CONFIGS[config]), batch_sizes=batches,
                    input_len=128, output_len=16, prefill_lens=[128], num_iters=1,
                    progress=False))
            except Exception as exc:  # noqa: BLE001 - report and go on with the next one
                print(f"{name} {config}: FAILED {type(exc).__name__}: {exc}", flush=True)
                _release()
                continue
            (out / f"lat_{name}_{config}.json").write_text(json.dumps(result, default=str))
            cells = " | ".join(
                f"bs{b}: {d['median_step_s'] * 1e3:.2f} ms "
                f"({d.get('overhead_pct', float('nan')):.1f}% outside)"
                for b, d in sorted(result["decode"].items()))
            print(f"{name:12s} {config:18s} {cells}  [{time.perf_counter() - begin:.0f} s]",
                  flush=True)
            _release()
    if args.throughput:
        throughput(out, args.models[0], common)


def throughput(out: Path, model: str, common: dict) -> None:
    from backplane.benchmarks.throughput import ThroughputOptions, run_throughput
    from backplane.benchmarks.workload import WorkloadSpec
    from backplane.config import EngineArgs

    name = Path(model).name
    # Small enough that transformers' generate fits a time-boxed run (its batch-64 pass
    # over 128 requests did not, on an H200, inside 90 s with the engine run before it).
    workload = WorkloadSpec(num_prompts=64, output_len=64, input_len_range=(64, 512), seed=0)
    for config, baseline in (("eager", "transformers"), ("graphs_async", None)):
        begin = time.perf_counter()
        try:
            result = run_throughput(ThroughputOptions(
                EngineArgs(model=model, **common, **CONFIGS[config]), workload,
                baseline=baseline, baseline_batch_sizes=(64,), progress=False))
        except Exception as exc:  # noqa: BLE001
            print(f"throughput {config}: FAILED {type(exc).__name__}: {exc}", flush=True)
            _release()
            continue
        (out / f"tput_{name}_{config}.json").write_text(json.dumps(result, default=str))
        line = (f"throughput {name} {config}: "
                f"{result['backplane']['output_tokens_per_s']['median']:.1f} output tok/s")
        if "transformers" in result:
            line += f"; transformers {json.dumps(result['transformers'], default=str)[:200]}"
        print(line + f"  [{time.perf_counter() - begin:.0f} s]", flush=True)
        _release()


if __name__ == "__main__":
    main()
