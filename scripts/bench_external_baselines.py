#!/usr/bin/env python3
"""W1, W2, W3 of issue 19 through Backplane, vLLM and llama.cpp (`bench throughput --baseline`).

A reproducibility script for docs/benchmarks.md (CI never runs it). It waits
for a quiet machine (1-minute load below --max-load) before each workload, runs

    backplane bench throughput --workload wN --baseline vllm --baseline llama.cpp ...

with the KV cache of every engine sized alike (Backplane --num-kv-blocks, vLLM
--vllm-kv-cache-gib, llama.cpp slots x longest request), writes each JSON
result to --out, and prints one summary line per workload::

    python scripts/bench_external_baselines.py --model /tmp/bench_models/qwen2-0.5b \\
        --baseline-python /tmp/vllmvenv/bin/python \\
        --llama-server /tmp/lcp/build/bin/llama-server --gguf /tmp/gguf/qwen2-0.5b.gguf \\
        --out /tmp/ext-bench [--workloads w1,w2,w3] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for_quiet(max_load: float, max_wait_s: float) -> float | None:
    """The 1-minute load once it is below max_load; None if it stayed above for max_wait_s."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = os.getloadavg()[0]
        if load < max_load:
            return load
        if time.monotonic() > deadline:
            return None
        print(f"load {load:.2f} >= {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(15)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--baseline-python", default=None)
    p.add_argument("--llama-server", default=None)
    p.add_argument("--gguf", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--workloads", default="w1,w2,w3")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--max-wait", type=float, default=600.0,
                   help="seconds to wait for quiet before a workload is skipped")
    # 5461 blocks x 16 tokens x 12 KiB (qwen2-0.5b, bf16) = 1 GiB, vLLM's 1 GiB (it takes
    # whole GiB only); W2 needs 64 x 640 tokens = 480 MiB of it.
    p.add_argument("--num-kv-blocks", type=int, default=5461)
    p.add_argument("--vllm-kv-cache-gib", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=1024)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    baselines = []
    if args.baseline_python:
        baselines += ["--baseline", "vllm", "--baseline-python", args.baseline_python,
                      "--vllm-kv-cache-gib", str(args.vllm_kv_cache_gib)]
    if args.llama_server:
        baselines += ["--baseline", "llama.cpp", "--llama-server", args.llama_server,
                      "--gguf", args.gguf]
    for wl in args.workloads.split(","):
        load = wait_for_quiet(args.max_load, args.max_wait)
        if load is None:
            # Figures taken while other work shares the cores compare nothing; skip.
            print(f"{wl}: skipped, load stayed >= {args.max_load} for {args.max_wait:.0f} s",
                  flush=True)
            continue
        out = os.path.join(args.out, f"{wl}.json")
        cmd = [sys.executable, "-m", "backplane.entrypoints.cli.main", "bench", "throughput",
               "--model", args.model, "--workload", wl, "--repeat", str(args.repeat),
               "--num-kv-blocks", str(args.num_kv_blocks), "--max-model-len",
               str(args.max_model_len), "--no-progress", "--json", out,
               "--baseline-log-dir", os.path.join(args.out, f"{wl}-logs"), *baselines]
        print(f"{wl} (load {load:.2f}): {' '.join(cmd)}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
        with open(out) as f:
            result = json.load(f)
        parts = [f"backplane {result['backplane']['output_tokens_per_s']['median']:.1f} tok/s "
                 f"{result['backplane']['peak_rss_bytes']['median'] / 2**20:.0f} MiB"]
        for name, fig in result["baselines"].items():
            ratio = result["ratios"][name]["output_tokens_per_s"]["median"]
            parts.append(f"{name} {fig['output_tokens_per_s']['median']:.1f} tok/s "
                         f"{fig['peak_rss_bytes']['median'] / 2**20:.0f} MiB (x{ratio:.2f})")
        print(f"{wl}: " + "; ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
