"""`backplane bench latency`: decode step time per batch size, prefill time per prompt length.

Decode: for each batch size B, B requests of ``input_len`` tokens start
together and generate ``output_len`` tokens each; the median time of the
steps in which exactly those B requests each advanced by one token is the
decode step time at B (per token: divided by B). Prefill: one request of
each prompt length with max_tokens=1, fresh random tokens every iteration so
prefix caching cannot help; the median wall time is the prefill time.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from backplane.benchmarks.ceiling import compare_with_engine as _compare
from backplane.benchmarks.ceiling import measure_ceiling, physical_floors, platform_model_hook
from backplane.benchmarks.engine_runner import (
    create_engine,
    engine_dtype,
    engine_hf_config,
    run_requests,
    warm_up,
)
from backplane.benchmarks.report import dump_json, print_table
from backplane.benchmarks.step_timing import decode_step_summary
from backplane.benchmarks.workload import WorkloadSpec, build_requests, token_id_range

logger = logging.getLogger(__name__)


@dataclass
class LatencyOptions:
    """What `bench latency` measures."""

    engine_args: Any  # backplane.config.EngineArgs
    batch_sizes: list[int]
    input_len: int = 128
    output_len: int = 32
    prefill_lens: list[int] = field(default_factory=lambda: [128, 512])
    num_iters: int = 3
    ceiling: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the bad field and value."""
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes ({self.batch_sizes}) must be positive integers")
        if self.output_len < 4:
            raise ValueError(
                f"output_len ({self.output_len}) must be at least 4 so that each batch size "
                "has several decode-only steps to time"
            )
        if self.input_len < 1:
            raise ValueError(f"input_len ({self.input_len}) must be at least 1")
        if any(n < 1 for n in self.prefill_lens):
            raise ValueError(f"prefill_lens ({self.prefill_lens}) must be positive integers")
        if self.num_iters < 1:
            raise ValueError(f"num_iters ({self.num_iters}) must be at least 1")


def run_latency(opts: LatencyOptions) -> dict:
    """Measure decode and prefill latency; returns the result dictionary."""
    import torch
    from tqdm import tqdm

    opts.validate()
    if opts.engine_args.max_num_seqs < max(opts.batch_sizes):
        raise ValueError(
            f"batch size {max(opts.batch_sizes)} exceeds max_num_seqs "
            f"({opts.engine_args.max_num_seqs}); raise --max-num-seqs"
        )
    engine = create_engine(opts.engine_args)
    dtype = engine_dtype(engine)
    low, high = token_id_range(engine.tokenizer)
    warm_up(engine, low, high)
    seed = opts.engine_args.seed
    decode: dict[int, dict] = {}
    bar = tqdm(total=len(opts.batch_sizes) * opts.num_iters + len(opts.prefill_lens)
               * opts.num_iters, desc="latency", disable=not opts.progress, leave=False)
    # Pipeline parallel: each engine step advances one micro-batch (1/depth of the
    # requests, the others being in flight); the batch's step is depth such steps.
    depth = opts.engine_args.pipeline_parallel_size
    for batch in opts.batch_sizes:
        micro = -(-batch // depth)
        steps = []
        for _ in range(opts.num_iters):
            seed += 1
            reqs = build_requests(WorkloadSpec(batch, opts.output_len, input_len=opts.input_len,
                                               seed=seed), low, high)
            steps += [s for s in run_requests(engine, reqs).steps if s.batch_size == micro]
            bar.update(1)
        summary = decode_step_summary(steps).get(micro)
        if summary is None:
            raise RuntimeError(f"no decode-only steps at batch size {micro} were observed")
        if micro != batch:
            rounds = -(-batch // micro)
            summary["pipeline_micro_batch"] = micro
            summary["median_micro_step_s"] = summary["median_step_s"]
            summary["median_step_s"] *= rounds  # every request of the batch got one token
            summary["median_per_token_s"] = summary["median_step_s"] / batch
        decode[batch] = summary
    prefill: dict[int, dict] = {}
    for length in opts.prefill_lens:
        times = []
        for _ in range(opts.num_iters):
            seed += 1
            reqs = build_requests(WorkloadSpec(1, 1, input_len=length, seed=seed), low, high)
            begin = time.perf_counter()
            run_requests(engine, reqs, instrument=False)
            times.append(time.perf_counter() - begin)
            bar.update(1)
        median = statistics.median(times)
        prefill[length] = {"median_s": median, "min_s": min(times), "max_s": max(times),
                           "tokens_per_s": length / median}
    bar.close()
    result: dict[str, Any] = {
        "model": opts.engine_args.model,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "input_len": opts.input_len,
        "output_len": opts.output_len,
        "num_iters": opts.num_iters,
        "engine_args": dataclasses.asdict(opts.engine_args),
        "decode": decode,
        "prefill": prefill,
    }
    hf_config = engine_hf_config(engine, opts.engine_args.model)
    prepare_model = platform_model_hook(engine)
    engine.shutdown()  # a split model's ranks or an engine process go now
    del engine
    gc.collect()
    if opts.ceiling:
        ceiling = measure_ceiling(hf_config, dtype, opts.batch_sizes, prepare_model=prepare_model)
        for batch, entry in ceiling.items():
            _compare(entry, decode[batch])
        result["ceiling"] = ceiling
        # The decode steps ran with input_len + output_len / 2 tokens of context on average.
        floors = physical_floors(hf_config, dtype, opts.batch_sizes,
                                 opts.input_len + opts.output_len // 2, prepare_model)
        for batch, entry in floors["batches"].items():
            entry["engine_fraction_of_floor"] = entry["floor_s"] / decode[batch]["median_step_s"]
        result["floors"] = floors
    return result


def result_rows(result: dict) -> list[tuple[str, Any]]:
    """Table rows of a latency result."""
    rows: list[tuple[str, Any]] = [
        ("model", result["model"]),
        ("dtype / torch threads", f"{result['dtype']} / {result['torch_threads']}"),
        ("decode prompt len / output len", f"{result['input_len']} / {result['output_len']}"),
    ]
    for batch, d in result["decode"].items():
        line = f"decode bs={batch}"
        rows.append((f"{line}: step ms", 1e3 * d["median_step_s"]))
        if "pipeline_micro_batch" in d:
            rows.append((f"{line}: pipeline micro-batch step ms "
                         f"({d['pipeline_micro_batch']} requests)", 1e3 * d["median_micro_step_s"]))
        rows.append((f"{line}: ms per token", 1e3 * d["median_per_token_s"]))
        if "overhead_pct" in d:
            rows.append((f"{line}: outside model %", d["overhead_pct"]))
        if "cpu_util" in d:
            rows.append((f"{line}: CPU utilisation", d["cpu_util"]))
        if "median_comm_s" in d:
            rows.append((f"{line}: collectives ms (rank 0)", 1e3 * d["median_comm_s"]))
        c = result.get("ceiling", {}).get(batch)
        if c:
            rows.append((f"{line}: ceiling ms ({c['layout']})", 1e3 * c["step_s"]))
            rows.append((f"{line}: ceiling CPU utilisation", c["cpu_util"]))
            rows.append((f"{line}: fraction of ceiling", c["engine_fraction_of_ceiling"]))
            if "engine_fraction_of_ceiling_cpu" in c:
                rows.append((f"{line}: fraction of ceiling (CPU time)",
                             c["engine_fraction_of_ceiling_cpu"]))
        f = result.get("floors", {}).get("batches", {}).get(batch)
        if f:
            rows.append((f"{line}: floor ms ({f['bound']}-bound)", 1e3 * f["floor_s"]))
            rows.append((f"{line}: fraction of floor", f["engine_fraction_of_floor"]))
    if result.get("floors"):
        rows.append(("streaming read GB/s (measured)", result["floors"]["stream_gb_per_s"]))
        rows.append(("best GEMM GFLOP/s (measured)", result["floors"]["gemm_gflops"]))
    for length, p in result["prefill"].items():
        rows.append((f"prefill {length} tokens: ms", 1e3 * p["median_s"]))
        rows.append((f"prefill {length} tokens: tokens/s", p["tokens_per_s"]))
    return rows


def main(args) -> int:
    """Entry point of `backplane bench latency`."""
    from backplane.config.cli_args import engine_args_from_cli

    opts = LatencyOptions(
        engine_args=engine_args_from_cli(args),
        batch_sizes=args.batch_sizes,
        input_len=args.input_len,
        output_len=args.output_len,
        prefill_lens=args.input_lens,
        num_iters=args.num_iters,
        ceiling=args.ceiling,
        progress=not args.no_progress,
    )
    result = run_latency(opts)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print_table("backplane bench latency", result_rows(result), out=table_out)
    if args.json:
        dump_json(result, args.json)
    return 0
