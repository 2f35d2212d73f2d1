"""`backplane bench throughput`: offline engine throughput on a synthetic request set.

Every comparison is a ratio measured in the same process run: the engine
against transformers `generate` (`--baseline transformers`), the engine's
decode steps against the linear-layer ceiling (`--ceiling`), prefix caching
on against off (`--compare-prefix-caching`). With `--repeat K` each figure is
measured K times on fresh prompts (so prefix caching cannot reuse an earlier
repeat's blocks) and the median and range are quoted.

`--baseline vllm` / `--baseline llama.cpp` cannot share this process (other
torch, or C++): they, and Backplane with them, run in fresh processes per
repeat (`backplane.benchmarks.external`), and `main` hands over to that.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
from dataclasses import dataclass
from typing import Any

from backplane.benchmarks import memory
from backplane.benchmarks.ceiling import compare_with_engine as _compare
from backplane.benchmarks.ceiling import measure_ceiling, platform_model_hook
from backplane.benchmarks.engine_runner import (
    EngineRun,
    create_engine,
    engine_dtype,
    engine_hf_config,
    kv_cache_tokens,
    run_requests,
    warm_up,
)
from backplane.benchmarks.external import (
    EXTERNAL_BASELINES,
    check_unsupported,
    external_rows,
    options_from_args,
    run_external,
)
from backplane.benchmarks.hf_baseline import DEFAULT_BATCH_SIZES, TransformersBaseline
from backplane.benchmarks.report import dump_json, median_and_range, print_table
from backplane.benchmarks.step_timing import decode_step_summary
from backplane.benchmarks.workload import (
    WorkloadSpec,
    build_requests,
    resolve_workload_args,
    token_id_range,
)

logger = logging.getLogger(__name__)


@dataclass
class ThroughputOptions:
    """Everything `bench throughput` was asked to do (the parsed command line)."""

    engine_args: Any  # backplane.config.EngineArgs
    workload: WorkloadSpec
    repeat: int = 1
    baseline: str | None = None
    baseline_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    ceiling: bool = False
    ceiling_batch_sizes: tuple[int, ...] | None = None
    compare_prefix_caching: bool = False
    temperature: float = 0.0
    progress: bool = True
    # --structured-json: every request constrained by STRUCTURED_JSON_SCHEMA.
    structured_json: bool = False
    # --lora-modules / --lora-mix: request i runs on adapter i % lora_mix (0: the base).
    lora_modules: tuple = ()
    lora_mix: int = 0

    def lora_requests(self) -> list:
        """The adapters the requests cycle through (empty: the base model)."""
        if self.lora_mix < 0 or self.lora_mix > len(self.lora_modules):
            raise ValueError(f"lora_mix ({self.lora_mix}) must be in 0..{len(self.lora_modules)} "
                             "(the number of --lora-modules)")
        return list(self.lora_modules[: self.lora_mix])


# The --structured-json constraint: an array of small records. ``minItems`` is set to
# output_len (`structured_json_schema`): a record takes several tokens, so the array
# cannot close (and the grammar cannot end the request) before output_len tokens, and
# every request does the same work as without the constraint, every token masked by a
# real JSON-schema grammar.
STRUCTURED_JSON_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "name": {"type": "string", "maxLength": 12},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "ok"],
    },
}


def structured_json_schema(output_len: int) -> dict:
    """`STRUCTURED_JSON_SCHEMA` that cannot end before ``output_len`` tokens."""
    return {**STRUCTURED_JSON_SCHEMA, "minItems": output_len}


def _structured_outputs(opts: ThroughputOptions) -> dict | None:
    if not opts.structured_json:
        return None
    return {"json": structured_json_schema(opts.workload.output_len)}


def _engine_figures(runs: list[EngineRun]) -> dict:
    return {
        "requests_per_s": median_and_range([r.requests_per_s for r in runs]),
        "output_tokens_per_s": median_and_range([r.output_tokens_per_s for r in runs]),
        "total_tokens_per_s": median_and_range([r.total_tokens_per_s for r in runs]),
        "seconds": median_and_range([r.seconds for r in runs]),
    }


def _run_engine_repeats(opts: ThroughputOptions, engine_args: Any, label: str
                        ) -> tuple[Any, list[EngineRun], list]:
    """Build one engine, warm it up, run the workload `repeat` times on fresh prompts."""
    engine = create_engine(engine_args)
    low, high = token_id_range(engine.tokenizer)
    warm_up(engine, low, high)
    loras = opts.lora_requests()
    if loras:  # read every adapter from disk before the timed runs
        warm = WorkloadSpec(**{**vars(opts.workload), "num_prompts": len(loras),
                               "output_len": 2})
        run_requests(engine, build_requests(warm, low, high), lora_requests=loras)
    constraint = _structured_outputs(opts)
    if constraint is not None:  # compile (and cache) the grammar outside the timed runs
        warm = WorkloadSpec(**{**vars(opts.workload), "num_prompts": 1, "output_len": 2})
        run_requests(engine, build_requests(warm, low, high), opts.temperature,
                     structured_outputs=constraint)
    runs, request_sets = [], []
    for rep in range(opts.repeat):
        spec = WorkloadSpec(**{**vars(opts.workload), "seed": opts.workload.seed + rep})
        requests = build_requests(spec, low, high)
        request_sets.append(requests)
        run = run_requests(engine, requests, opts.temperature, progress=opts.progress,
                           desc=f"{label} {rep + 1}/{opts.repeat}", structured_outputs=constraint,
                           lora_requests=loras)
        logger.info("%s run %d: %.1f output tok/s", label, rep + 1, run.output_tokens_per_s)
        runs.append(run)
    return engine, runs, request_sets


def run_throughput(opts: ThroughputOptions) -> dict:
    """Run the benchmark described by ``opts``; returns the result dictionary."""
    import torch

    opts.workload.validate()
    if opts.repeat < 1:
        raise ValueError(f"repeat ({opts.repeat}) must be at least 1")
    if opts.baseline not in (None, "transformers"):
        raise ValueError(f"baseline {opts.baseline!r} is not supported here; use 'transformers' "
                         "(vllm and llama.cpp run out of process: backplane.benchmarks.external)")

    model = opts.engine_args.model
    rss_before = memory.current_rss_bytes()
    engine, runs, request_sets = _run_engine_repeats(opts, opts.engine_args, "backplane")
    threads = torch.get_num_threads()
    dtype = engine_dtype(engine)
    hf_config = engine_hf_config(engine, model)
    kv_tokens = kv_cache_tokens(engine)
    prepare_model = platform_model_hook(engine)
    # Peak RSS now, before the baseline or ceiling allocate their own copies of the weights.
    mem = memory.memory_report(hf_config, dtype, kv_tokens, memory.peak_rss_bytes())
    mem["kv_cache_tokens"] = kv_tokens
    # What the process held before the engine existed (interpreter, torch, transformers).
    mem["rss_before_engine_bytes"] = rss_before
    # The same ratio without what the interpreter held before the engine existed:
    # what serving this model costs on top of an idle Python process.
    budget = mem["weight_bytes"] + mem["kv_cache_bytes"]
    mem["engine_rss_over_weights_plus_kv"] = (
        (mem["peak_rss_bytes"] - rss_before) / budget if budget else float("nan"))
    mem["kv_tokens_needed_by_workload"] = max(
        sum(r.prompt_len + r.output_len for r in reqs) for reqs in request_sets
    )
    steps = [s for run in runs for s in run.steps]
    decode = decode_step_summary(steps)
    all_steps = [s for s in steps if s.model_seconds is not None]
    result: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "torch_threads": threads,
        "workload": {**vars(opts.workload), "repeat": opts.repeat},
        "structured_json": (structured_json_schema(opts.workload.output_len)
                            if opts.structured_json else None),
        "lora_mix": [r.lora_name for r in opts.lora_requests()],
        "engine_args": dataclasses.asdict(opts.engine_args),
        "timing_source": runs[0].timing_source,
        "backplane": _engine_figures(runs),
        "num_steps": len(steps),
        "overhead_pct_all_steps": (
            100.0 * sum(s.seconds - s.model_seconds for s in all_steps)
            / sum(s.seconds for s in all_steps) if all_steps else None
        ),
        "decode_steps": decode,
        "engine_stats": runs[-1].stats,
        "memory": mem,
    }
    engine.shutdown()  # a split model's ranks or an engine process go now
    del engine
    gc.collect()

    if opts.compare_prefix_caching:
        # The main run above used the given setting; run the other one now so that
        # both are measured in this process on the same prompts.
        main_on = bool(opts.engine_args.enable_prefix_caching)
        other_args = dataclasses.replace(opts.engine_args, enable_prefix_caching=not main_on)
        other_engine, other_runs, _ = _run_engine_repeats(
            opts, other_args, "prefix caching " + ("off" if main_on else "on"))
        other_engine.shutdown()
        del other_engine
        gc.collect()
        on_runs, off_runs = (runs, other_runs) if main_on else (other_runs, runs)
        ratios = [a.output_tokens_per_s / b.output_tokens_per_s
                  for a, b in zip(on_runs, off_runs, strict=True)]
        result["prefix_caching"] = {
            "on": _engine_figures(on_runs),
            "off": _engine_figures(off_runs),
            "speedup_on_over_off": median_and_range(ratios),
        }

    hf_runs = None
    if opts.baseline == "transformers":
        baseline = TransformersBaseline(model, dtype, num_threads=threads)
        sweep = baseline.sweep(request_sets[0], opts.baseline_batch_sizes, progress=opts.progress)
        best = max(sweep, key=lambda r: r.output_tokens_per_s)
        hf_runs = [best] + [
            baseline.run(reqs, best.batch_size, progress=opts.progress)
            for reqs in request_sets[1:]
        ]
        ratios = [e.output_tokens_per_s / h.output_tokens_per_s
                  for e, h in zip(runs, hf_runs, strict=True)]
        result["transformers"] = {
            "best_batch_size": best.batch_size,
            "sweep": {r.batch_size: r.output_tokens_per_s for r in sweep},
            "requests_per_s": median_and_range([r.requests_per_s for r in hf_runs]),
            "output_tokens_per_s": median_and_range([r.output_tokens_per_s for r in hf_runs]),
            "total_tokens_per_s": median_and_range([r.total_tokens_per_s for r in hf_runs]),
        }
        result["speedup_over_transformers"] = median_and_range(ratios)
        del baseline
        gc.collect()

    if opts.ceiling:
        sizes = list(opts.ceiling_batch_sizes or [])
        if not sizes:
            # The engine's most and least loaded decode batches that were seen often enough.
            sizes = sorted({min(decode), max(decode)}) if decode else [1]
        ceiling = measure_ceiling(hf_config, dtype, sizes, prepare_model=prepare_model)
        for batch, entry in ceiling.items():
            if batch in decode:
                _compare(entry, decode[batch])
        result["ceiling"] = ceiling
        prefill = measure_ceiling(hf_config, dtype, [PREFILL_CEILING_TOKENS],
                                  prepare_model=prepare_model, lm_head=False)
        result["prefill_ceiling"] = prefill[PREFILL_CEILING_TOKENS]
        result["workload_floor"] = workload_floor(
            runs, request_sets, prefill[PREFILL_CEILING_TOKENS]["per_token_s"],
            ceiling[max(ceiling)]["per_token_s"], hf_runs)
    return result


# Tokens per forward of the prefill floor: a typical chunk under the default token budget.
PREFILL_CEILING_TOKENS = 512


def workload_floor(runs: list[EngineRun], request_sets: list, prefill_token_s: float,
                   decode_token_s: float, hf_runs: list | None = None) -> dict:
    """The least time the linear layers alone need for each run's work, and what that allows.

    Each prompt token the engine computed (prefix-cache hits left out) costs the
    prefill ceiling per token (no lm_head); each output token costs the decode
    ceiling per token at the largest decode batch (one lm_head row). Attention,
    norms and per-step Python are left out, and the batch shrinks as a run ends,
    so this is a lower bound on a run's time: it gives the engine's fraction of
    the floor, and the highest speedup over transformers this machine allows.
    """
    floors, fractions, hits_before = [], [], 0
    for run, requests in zip(runs, request_sets, strict=True):
        hits = int(run.stats.get("prefix_cache_hits", 0))
        computed = sum(r.prompt_len for r in requests) - (hits - hits_before)
        hits_before = hits
        floor = computed * prefill_token_s + sum(r.output_len for r in requests) * decode_token_s
        floors.append(floor)
        fractions.append(floor / run.seconds)
    out = {
        "prefill_s_per_token": prefill_token_s,
        "decode_s_per_token": decode_token_s,
        "seconds": median_and_range(floors),
        "engine_fraction": median_and_range(fractions),
    }
    if hf_runs:
        out["max_speedup_over_transformers"] = median_and_range(
            [h.seconds / f for h, f in zip(hf_runs, floors, strict=True)])
    return out


def result_rows(result: dict) -> list[tuple[str, Any]]:
    """The human-readable table rows of a throughput result."""
    bp = result["backplane"]
    wl = result["workload"]
    lens = (f"{wl['input_len_range'][0]}..{wl['input_len_range'][1]}"
            if wl.get("input_len_range") else str(wl["input_len"]))
    rows: list[tuple[str, Any]] = [
        ("model", result["model"]),
        ("dtype / torch threads", f"{result['dtype']} / {result['torch_threads']}"),
        ("requests x input x output", f"{wl['num_prompts']} x "
         f"{(str(wl['prefix_len']) + '+') if wl['prefix_len'] else ''}{lens} x {wl['output_len']}"),
        ("repeats (median quoted)", wl["repeat"]),
        ("structured outputs", "JSON schema on every request (--structured-json)"
         if result.get("structured_json") else "none"),
        ("LoRA adapters mixed", len(result.get("lora_mix") or [])),
        ("requests/s", bp["requests_per_s"]["median"]),
        ("output tokens/s", bp["output_tokens_per_s"]["median"]),
        ("total tokens/s", bp["total_tokens_per_s"]["median"]),
    ]
    engine_stats = result.get("engine_stats") or {}
    if "spec_acceptance_rate" in engine_stats:
        rows.append(("speculative: acceptance rate", engine_stats["spec_acceptance_rate"]))
        rows.append(("speculative: mean accepted length",
                     engine_stats["spec_mean_accepted_length"]))
    if wl["repeat"] > 1:
        r = bp["output_tokens_per_s"]
        rows.append(("output tokens/s range", f"{r['min']:.1f} .. {r['max']:.1f}"))
    if result.get("overhead_pct_all_steps") is not None:
        rows.append(("CPU overhead outside model, all steps %", result["overhead_pct_all_steps"]))
    for batch, d in result["decode_steps"].items():
        rows.append((f"decode bs={batch}: step ms", 1e3 * d["median_step_s"]))
        if "overhead_pct" in d:
            rows.append((f"decode bs={batch}: outside model %", d["overhead_pct"]))
        if "sampler_pct" in d:
            rows.append((f"decode bs={batch}: sampler %", d["sampler_pct"]))
        if "grammar_mask_pct" in d:
            rows.append((f"decode bs={batch}: grammar masks %", d["grammar_mask_pct"]))
        if "median_comm_s" in d:
            rows.append((f"decode bs={batch}: collectives ms (rank 0)",
                         1e3 * d["median_comm_s"]))
        if "cpu_util" in d:
            rows.append((f"decode bs={batch}: CPU utilisation", d["cpu_util"]))
    if "prefix_caching" in result:
        pc = result["prefix_caching"]
        rows.append(("prefix caching on: output tok/s", pc["on"]["output_tokens_per_s"]["median"]))
        rows.append(("prefix caching off: output tok/s",
                     pc["off"]["output_tokens_per_s"]["median"]))
        rows.append(("prefix caching speedup (on/off)", pc["speedup_on_over_off"]["median"]))
    if "transformers" in result:
        hf = result["transformers"]
        rows.append((f"transformers output tok/s (bs={hf['best_batch_size']})",
                     hf["output_tokens_per_s"]["median"]))
        rows.append(("speedup over transformers", result["speedup_over_transformers"]["median"]))
    for batch, c in result.get("ceiling", {}).items():
        rows.append((f"ceiling bs={batch}: linear layers ms ({c['layout']})", 1e3 * c["step_s"]))
        rows.append((f"ceiling bs={batch}: CPU utilisation", c["cpu_util"]))
        if "engine_fraction_of_ceiling" in c:
            rows.append((f"ceiling bs={batch}: engine fraction", c["engine_fraction_of_ceiling"]))
        if "engine_fraction_of_ceiling_cpu" in c:
            rows.append((f"ceiling bs={batch}: engine fraction (CPU time)",
                         c["engine_fraction_of_ceiling_cpu"]))
    if "workload_floor" in result:
        floor = result["workload_floor"]
        rows.append((f"prefill ceiling ms/token ({PREFILL_CEILING_TOKENS}-token forward, no lm_head)",
                     1e3 * floor["prefill_s_per_token"]))
        rows.append(("workload floor s (linear layers only)", floor["seconds"]["median"]))
        rows.append(("engine fraction of the workload floor", floor["engine_fraction"]["median"]))
        if "max_speedup_over_transformers" in floor:
            rows.append(("speedup over transformers at the floor",
                         floor["max_speedup_over_transformers"]["median"]))
    mem = result["memory"]
    rows.append(("peak RSS MiB", mem["peak_rss_bytes"] / 2**20))
    rows.append(("weights + KV cache MiB", (mem["weight_bytes"] + mem["kv_cache_bytes"]) / 2**20))
    rows.append(("peak RSS / (weights + KV)", mem["rss_over_weights_plus_kv"]))
    rows.append(("RSS before the engine MiB", mem["rss_before_engine_bytes"] / 2**20))
    if "engine_rss_over_weights_plus_kv" in mem:
        rows.append(("(peak - before) / (weights + KV)", mem["engine_rss_over_weights_plus_kv"]))
    return rows


def _lora_modules(entries: list[str] | None) -> list:
    """LoRARequests from ``NAME=PATH`` entries (ids 1, 2, ...)."""
    from backplane.lora import LoRARequest

    requests = []
    for index, entry in enumerate(entries or [], start=1):
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules entry {entry!r} must be NAME=PATH")
        requests.append(LoRARequest(name, index, path))
    return requests


def main(args) -> int:
    """Entry point of `backplane bench throughput` (args from the CLI parser)."""
    from backplane.config.cli_args import engine_args_from_cli

    engine_args = engine_args_from_cli(args)
    resolve_workload_args(args)  # idempotent; for callers that skip the CLI's own call
    spec = WorkloadSpec(
        num_prompts=args.num_prompts,
        output_len=args.output_len,
        input_len=args.input_len,
        input_len_range=tuple(args.input_len_range) if args.input_len_range else None,
        prefix_len=args.prefix_len,
        seed=engine_args.seed,
    )
    # --baseline is repeatable (a list); older callers pass one name or None.
    baselines = [args.baseline] if isinstance(args.baseline, str) else list(args.baseline or [])
    if any(b in EXTERNAL_BASELINES for b in baselines):
        if "transformers" in baselines:
            raise ValueError("--baseline transformers runs in this process and cannot be "
                             "combined with --baseline vllm / llama.cpp; run them separately")
        args.baseline = baselines
        return _main_external(args, engine_args, spec)
    opts = ThroughputOptions(
        engine_args=engine_args,
        workload=spec,
        repeat=args.repeat,
        baseline=baselines[0] if baselines else None,
        baseline_batch_sizes=tuple(args.baseline_batch_sizes),
        ceiling=args.ceiling,
        ceiling_batch_sizes=tuple(args.ceiling_batch_sizes) if args.ceiling_batch_sizes else None,
        compare_prefix_caching=args.compare_prefix_caching,
        temperature=args.temperature,
        progress=not args.no_progress,
        structured_json=getattr(args, "structured_json", False),
        lora_modules=tuple(_lora_modules(getattr(args, "lora_modules", None))),
        lora_mix=getattr(args, "lora_mix", 0),
    )
    result = run_throughput(opts)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print_table("backplane bench throughput", result_rows(result), out=table_out)
    if args.json:
        dump_json(result, args.json)
    return 0


def _main_external(args, engine_args, spec: WorkloadSpec) -> int:
    """`--baseline vllm|llama.cpp`: every engine in fresh processes (backplane.benchmarks.external)."""
    import signal

    check_unsupported(args)
    # SIGTERM as an exception: the engine processes (each in a session of its own, so a
    # terminal's Ctrl-C does not reach them) are then killed on the way out, not orphaned.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run_external(options_from_args(args, engine_args, spec))
    finally:
        signal.signal(signal.SIGTERM, previous)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print_table("backplane bench throughput vs " + " / ".join(result["baselines"]),
                external_rows(result), out=table_out)
    if args.json:
        dump_json(result, args.json)
    return 0
