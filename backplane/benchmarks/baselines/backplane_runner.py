"""Run a `bench throughput` request file through a fresh Backplane engine, print the result.

The Backplane side of `--baseline vllm|llama.cpp`: the same request file and
result line as the baseline runners, in a process of its own, so the two
engines are measured the same way (fresh interpreter, untimed warm-up, peak RSS
of that process alone). Usage: ``python -m backplane.benchmarks.baselines.backplane_runner
REQUESTS.json``; the file's ``engine_args`` are `EngineArgs` fields.
"""

from __future__ import annotations

import json
import sys
import time

from backplane.benchmarks.baselines.procs import RESULT_MARKER


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m backplane.benchmarks.baselines.backplane_runner REQUESTS.json",
              file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)

    import torch

    from backplane.benchmarks import memory
    from backplane.benchmarks.engine_runner import (
        create_engine,
        engine_dtype,
        kv_cache_tokens,
        run_requests,
    )
    from backplane.benchmarks.workload import BenchRequest
    from backplane.config.engine_args import EngineArgs

    def requests_of(entries: list[dict]) -> list[BenchRequest]:
        return [BenchRequest(r["request_id"], r["prompt_token_ids"], r["output_len"])
                for r in entries]

    start = time.perf_counter()
    engine = create_engine(EngineArgs(**spec["engine_args"]))
    load_seconds = time.perf_counter() - start
    temperature = spec.get("temperature", 0.0)
    if spec.get("warmup_requests"):
        run_requests(engine, requests_of(spec["warmup_requests"]), temperature, instrument=False)
    run = run_requests(engine, requests_of(spec["requests"]), temperature, instrument=False)
    result = {
        "engine": "backplane",
        "seconds": run.seconds,
        "load_seconds": load_seconds,
        "num_requests": run.num_requests,
        "prompt_tokens": run.prompt_tokens,
        "output_tokens": run.output_tokens,
        "threads": torch.get_num_threads(),
        "dtype": engine_dtype(engine),
        "kv_cache_tokens": kv_cache_tokens(engine),
        "prefix_cache_hits": run.stats.get("prefix_cache_hits"),
        "peak_rss_self_bytes": memory.peak_rss_bytes(),
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
