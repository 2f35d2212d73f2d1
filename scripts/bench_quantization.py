#!/usr/bin/env python3
"""bf16, int8 (W8A16, W8A8), gptq-int4 and fp8 KV side by side: speed and accuracy in one run.

A reproducibility script for docs/benchmarks.md ("Quantization side by side");
CI runs it only on tiny models (tests/benchmarks/test_bench_quantization_script.py).

Speed, on the bench checkpoints (random weights of a real shape), in interleaved
rounds: each round runs every variant once, in turn, so that machine drift hits
all alike. Per variant and round, in this process:

- batch-1 decode: `run_latency` (`bench latency --batch-sizes 1`), the median
  decode step in ms/token and 1000 / that in tok/s;
- batch-64 mixed workload: `run_throughput` (`bench throughput`) on
  --num-prompts requests with prompts uniform in --input-len-range and
  --output-len tokens each (ignore_eos), output tok/s.

Accuracy, against bf16 on small models (--acc-models): the tiny fixture Llama
(tests/fixtures/tiny_models.py ``make_tiny_model`` with hidden 256 so that
group-128 int4 applies as on the bench shape; float32 weights loaded as bf16)
and the trained demo Llama (backplane/demo_model). Random bench weights give
near-uniform distributions, so they say nothing about accuracy. The bf16 engine
generates --acc-tokens greedy tokens for each of --acc-prompts fixed prompts;
every variant then reads prompt + those tokens teacher-forced (prompt_logprobs,
so positions align), and at each generated position the script compares the
logprob of the bf16 greedy token (mean and max |Δlogprob|) and whether the
variant's top-1 token is bf16's (top-1 agreement). The fp8 KV cache is read by
the prefill attention too (cpu_paged writes, then attends over the cache), so
teacher forcing sees its rounding.

Other processes on the cores skew every figure (two threads waiting on each other
at a barrier lose most when one core is taken): each run records the cores other
processes used (/proc/stat), and --max-other-cores waits for quiet and reruns a
disturbed run.

    python scripts/bench_quantization.py --model /tmp/bench_models/qwen2-0.5b \\
        --gptq-model /tmp/bench_models/qwen2-0.5b-gptq-int4 \\
        [--int8-model /tmp/bench_models/qwen2-0.5b-int8] [--rounds 3] \\
        [--llama-bench /tmp/lcp/build/bin/llama-bench --gguf-q8 Q8_0.gguf] \\
        [--max-other-cores 0.3] --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
# tests.fixtures (the accuracy model) lives beside the package; wait_for_quiet beside this.
for _path in (REPO, SCRIPTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_external_baselines import wait_for_quiet  # noqa: E402

HEAD_ENV = "BACKPLANE_CPU_HEAD_QUANTIZATION"


@dataclass(frozen=True)
class Variant:
    """One way of running the model: which checkpoint, engine flags and output head."""

    name: str
    description: str
    checkpoint: str = "bf16"  # "bf16", "gptq" or "int8" (the compressed-tensors one)
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    head: str | None = None  # BACKPLANE_CPU_HEAD_QUANTIZATION


VARIANTS = [
    Variant("bf16", "bf16 weights, bf16 KV cache"),
    Variant("int8-w8a16", "--quantization int8_weight_only (head int8 too)",
            quantization="int8_weight_only"),
    Variant("int8-w8a8", "--quantization int8 (head int8 too)", quantization="int8"),
    Variant("gptq-int4", f"gptq-int4 checkpoint, group 128, {HEAD_ENV}=int4", checkpoint="gptq",
            head="int4"),
    Variant("fp8-kv", "bf16 weights, --kv-cache-dtype fp8", kv_cache_dtype="fp8"),
    Variant("ct-int8", f"compressed-tensors int8 (W8A8) checkpoint, {HEAD_ENV}=int8",
            checkpoint="int8", head="int8"),
]
BY_NAME = {v.name: v for v in VARIANTS}
# Issue targets: batch-1 decode speed-up over bf16.
TARGETS = {"int8-w8a16": 1.7, "int8-w8a8": 1.7, "ct-int8": 1.7, "gptq-int4": 2.5}


@contextlib.contextmanager
def head_env(head: str | None):
    """BACKPLANE_CPU_HEAD_QUANTIZATION set to ``head`` (unset for None) while the engine loads."""
    old = os.environ.pop(HEAD_ENV, None)
    if head:
        os.environ[HEAD_ENV] = head
    try:
        yield
    finally:
        os.environ.pop(HEAD_ENV, None)
        if old is not None:
            os.environ[HEAD_ENV] = old


def _spread(values: list[float]) -> dict:
    from backplane.benchmarks.report import median_and_range

    return median_and_range([v for v in values if v is not None and math.isfinite(v)])


# ---------------------------------------------------------------- speed


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat; NaN where it cannot be read)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores that other processes kept busy while the block ran (all busy CPU time minus
    this process's and its waited-for children's, over the wall time): work sharing the
    cores skews a figure."""

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self):
        self._busy, self._own0, self._wall = _busy_seconds(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._wall
        own = self._own() - self._own0
        self.cores = max(0.0, (_busy_seconds() - self._busy - own) / wall) if wall else math.nan
        return False


@dataclass
class SpeedOptions:
    """The speed part: rounds, the batch-1 decode run and the batch workload."""

    rounds: int = 3
    b1_input_len: int = 128
    b1_output_len: int = 32
    b1_iters: int = 2
    num_prompts: int = 64
    input_len_range: tuple[int, int] = (32, 96)
    output_len: int = 32
    seed: int = 0
    max_load: float | None = None  # wait for a 1-minute load below this before each run
    max_wait: float = 300.0
    # Before each run, wait for other processes to use at most this many cores (sampled
    # over 3 s); rerun (up to `retries` times) a run during which they used more.
    max_other_cores: float | None = None
    retries: int = 1

    def engine_args(self, variant: Variant, models: dict[str, str], seed: int):
        from backplane.config import EngineArgs

        longest = max(self.input_len_range[1] + self.output_len,
                      self.b1_input_len + self.b1_output_len, 36)  # warm_up: 32 + 4 tokens
        block = 16
        # Every request of the batch at once, plus the warm-up's, with some slack.
        blocks = self.num_prompts * (-(-longest // block) + 1) + 32
        return EngineArgs(model=models[variant.checkpoint], dtype="bfloat16",
                          quantization=variant.quantization,
                          kv_cache_dtype=variant.kv_cache_dtype, max_model_len=longest + block,
                          num_kv_blocks=blocks, max_num_seqs=max(self.num_prompts, 1), seed=seed)


def wait_for_idle(max_cores: float, max_wait_s: float, sample_s: float = 3.0) -> float:
    """Sleep until other processes keep at most ``max_cores`` busy over ``sample_s``
    (or ``max_wait_s`` passed); returns the last sample."""
    deadline = time.monotonic() + max_wait_s
    while True:
        with OtherLoad() as other:
            time.sleep(sample_s)
        if other.cores <= max_cores or time.monotonic() > deadline:
            return other.cores


def speed_once(variant: Variant, models: dict[str, str], opts: SpeedOptions, seed: int) -> dict:
    """One round of one variant: `run_latency` at batch 1, then `run_throughput`."""
    from backplane.benchmarks.latency import LatencyOptions, run_latency
    from backplane.benchmarks.throughput import ThroughputOptions, run_throughput
    from backplane.benchmarks.workload import WorkloadSpec

    with head_env(variant.head):
        args = opts.engine_args(variant, models, seed)
        latency = run_latency(LatencyOptions(
            engine_args=args, batch_sizes=[1], input_len=opts.b1_input_len,
            output_len=opts.b1_output_len, prefill_lens=[], num_iters=opts.b1_iters,
            progress=False))
        gc.collect()
        spec = WorkloadSpec(num_prompts=opts.num_prompts, output_len=opts.output_len,
                            input_len_range=opts.input_len_range, seed=seed)
        throughput = run_throughput(ThroughputOptions(engine_args=args, workload=spec,
                                                      progress=False))
        gc.collect()
    step = latency["decode"][1]["median_per_token_s"]
    return {"b1_ms_per_token": 1e3 * step, "b1_tok_s": 1.0 / step,
            "batch_tok_s": throughput["backplane"]["output_tokens_per_s"]["median"],
            "batch_seconds": throughput["backplane"]["seconds"]["median"]}


def llama_bench_once(binary: str, gguf: str, threads: int, n_gen: int, reps: int) -> float:
    """llama.cpp's tg``n_gen`` (`llama-bench -p 0 -n N -t T -o json`) in tok/s."""
    out = subprocess.run([binary, "-m", gguf, "-p", "0", "-n", str(n_gen), "-t", str(threads),
                          "-r", str(reps), "-o", "json"], check=True, capture_output=True,
                         text=True)
    rows = [r for r in json.loads(out.stdout) if r.get("n_gen") == n_gen]
    return float(rows[0]["avg_ts"])


def _wait(opts: SpeedOptions, progress) -> None:
    if opts.max_load is not None and wait_for_quiet(opts.max_load, opts.max_wait) is None:
        progress(f"load stayed >= {opts.max_load} for {opts.max_wait:.0f} s: running anyway")
    if opts.max_other_cores is not None:
        cores = wait_for_idle(opts.max_other_cores, opts.max_wait)
        if cores > opts.max_other_cores:
            progress(f"other processes still used {cores:.2f} cores after "
                     f"{opts.max_wait:.0f} s: running anyway")


def run_speed(variants: list[Variant], models: dict[str, str], opts: SpeedOptions,
              llama: dict[str, str] | None = None, progress=print) -> dict:
    """``opts.rounds`` interleaved rounds; medians, ranges and per-round ratios to bf16."""
    import torch

    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    llama_runs: dict[str, list[float]] = {name: [] for name in (llama or {}) if name != "binary"}
    for rnd in range(opts.rounds):
        # Each round starts at a different variant, so that whatever the position costs
        # (the first run of the process, the one right after llama.cpp's) does not
        # fall on the same variant every round. On a 2-core Zen 5, bf16 first measured
        # 33 ms a token against 22.5 ms for the same weights with an fp8 cache later in
        # the round; rotated, the spread moved with the machine, not the position.
        shift = rnd % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            for attempt in range(opts.retries + 1):
                _wait(opts, progress)
                begin = time.perf_counter()
                load = os.getloadavg()[0]
                with OtherLoad() as other:
                    run = speed_once(variant, models, opts, opts.seed + rnd)
                run.update(load_before=load, other_cores=other.cores, attempt=attempt)
                if (opts.max_other_cores is None or other.cores <= opts.max_other_cores
                        or attempt == opts.retries):
                    break
                progress(f"round {rnd + 1} {variant.name}: other processes used "
                         f"{other.cores:.2f} cores, measuring again")
            runs[variant.name].append(run)
            progress(f"round {rnd + 1}/{opts.rounds} {variant.name}: "
                     f"b1 {run['b1_ms_per_token']:.1f} ms/token, batch "
                     f"{run['batch_tok_s']:.1f} tok/s ({time.perf_counter() - begin:.0f} s, "
                     f"load {load:.2f}, other processes {other.cores:.2f} cores)")
        for name in llama_runs:
            _wait(opts, progress)
            with OtherLoad() as other:
                tok_s = llama_bench_once(llama["binary"], llama[name], torch.get_num_threads(),
                                         opts.b1_input_len, 2)
            llama_runs[name].append(tok_s)
            progress(f"round {rnd + 1}/{opts.rounds} llama.cpp {name}: {tok_s:.1f} tok/s "
                     f"(other processes {other.cores:.2f} cores)")
    out: dict = {"variants": {}, "llama.cpp": {}}
    base = runs.get("bf16")
    for variant in variants:
        vr = runs[variant.name]
        entry = {key: _spread([r[key] for r in vr])
                 for key in ("b1_ms_per_token", "b1_tok_s", "batch_tok_s", "other_cores")}
        entry["runs"] = vr
        if base:
            entry["b1_speedup_vs_bf16"] = _spread(
                [b["b1_ms_per_token"] / r["b1_ms_per_token"] for b, r in zip(base, vr, strict=True)])
            entry["batch_speedup_vs_bf16"] = _spread(
                [r["batch_tok_s"] / b["batch_tok_s"] for b, r in zip(base, vr, strict=True)])
        out["variants"][variant.name] = entry
    for name, values in llama_runs.items():
        out["llama.cpp"][name] = {"tg_tok_s": _spread(values)}
    return out


# ---------------------------------------------------------------- accuracy

ACC_MODEL_CONFIG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64)
ACC_MODELS = {
    "fixture": "tiny fixture Llama (tests/fixtures/tiny_models.py make_tiny_model: random "
               "weights, initializer_range 0.1, hidden 256, 2 layers, vocab 512; float32 "
               "weights run as bf16)",
    "demo": "the bundled demo Llama (backplane/demo_model: trained, 5.8M parameters, hidden "
            "256, 6 layers, vocab 4096, bf16)",
}


def accuracy_model(root: str, which: str = "fixture") -> dict[str, str]:
    """The accuracy model ``which`` (ACC_MODELS) and its gptq-int4 (group 128) and
    compressed-tensors int8 checkpoints, written under ``root``."""
    from backplane.benchmarks.make_model import quantize_checkpoint

    if which == "fixture":
        from tests.fixtures.tiny_models import make_tiny_model

        src = make_tiny_model(os.path.join(root, which), "llama", dtype="float32",
                              **ACC_MODEL_CONFIG)
    elif which == "demo":
        from backplane.demo_model import default_model_path

        src = default_model_path()
    else:
        raise ValueError(f"accuracy model {which!r} is not one of {sorted(ACC_MODELS)}")
    models = {"bf16": src}
    for key, scheme in (("gptq", "gptq-int4"), ("int8", "int8")):
        dst = os.path.join(root, f"{which}-{scheme}")
        quantize_checkpoint(src, dst, scheme, group_size=128)
        models[key] = dst
    return models


def accuracy_prompts(tokenizer, count: int) -> list[list[int]]:
    """``count`` fixed English prompts (the fixture tokenizer's own corpus), as token ids."""
    from tests.fixtures.tiny_models import training_corpus

    lines = training_corpus()
    # Spread over the paragraphs and the generated sentences alike.
    picks = [lines[(i * len(lines)) // count] for i in range(count)]
    return [tokenizer.encode(line) for line in picks]


def _llm(variant: Variant, models: dict[str, str], max_len: int):
    from backplane import LLM

    return LLM(model=models[variant.checkpoint], dtype="bfloat16",
               quantization=variant.quantization, kv_cache_dtype=variant.kv_cache_dtype,
               max_model_len=max_len, num_kv_blocks=512, seed=0)


def run_accuracy(variants: list[Variant], models: dict[str, str], num_prompts: int = 16,
                 max_tokens: int = 32, description: str = "") -> dict:
    """Teacher-forced logprobs of each variant against bf16 over a fixed prompt set."""
    from backplane import SamplingParams
    from backplane.inputs import TokensPrompt

    bf16 = BY_NAME["bf16"]
    llm = _llm(bf16, models, 256)
    prompts = accuracy_prompts(llm.get_tokenizer(), num_prompts)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy,
                        use_tqdm=False)
    sequences = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs, strict=True)]
    del llm
    gc.collect()
    forced = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    # Per variant and generated position: (logprob of the bf16 greedy token, top-1 token).
    seen: dict[str, list[tuple[float, int]]] = {}
    for variant in [bf16] + [v for v in variants if v.name != "bf16"]:
        with head_env(variant.head):
            llm = _llm(variant, models, 256)
            outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], forced,
                                use_tqdm=False)
        rows = []
        for prompt, seq, out in zip(prompts, sequences, outs, strict=True):
            for pos in range(len(prompt), len(seq)):
                entry = out.prompt_logprobs[pos]
                top1 = next(t for t, lp in entry.items() if lp.rank == 1)
                rows.append((entry[seq[pos]].logprob, top1))
        seen[variant.name] = rows
        del llm
        gc.collect()
    ref = seen["bf16"]
    greedy_tokens = [seq[pos] for prompt, seq in zip(prompts, sequences, strict=True)
                     for pos in range(len(prompt), len(seq))]
    result: dict = {
        "model": description or models["bf16"],
        "num_prompts": num_prompts, "tokens_per_prompt": max_tokens,
        "positions": len(ref),
        "bf16_mean_top1_logprob": statistics.fmean(lp for lp, _ in ref),
        # bf16 read teacher-forced picks its own greedy tokens (batching noise aside).
        "bf16_self_agreement_pct": 100.0 * sum(
            t == g for (_, t), g in zip(ref, greedy_tokens, strict=True)) / len(ref),
        "variants": {},
    }
    for variant in variants:
        rows = seen[variant.name]
        diffs = [abs(a[0] - b[0]) for a, b in zip(ref, rows, strict=True)]
        result["variants"][variant.name] = {
            "mean_abs_dlogprob": statistics.fmean(diffs),
            "max_abs_dlogprob": max(diffs),
            "top1_agreement_pct": 100.0 * sum(
                a[1] == b[1] for a, b in zip(ref, rows, strict=True)) / len(rows),
        }
    return result


# ---------------------------------------------------------------- report


def _cell(spread: dict, fmt: str) -> str:
    if not spread or not spread.get("runs"):
        return "n/a"
    if len(spread["runs"]) == 1:
        return format(spread["median"], fmt)
    return (f"{format(spread['median'], fmt)} ({format(spread['min'], fmt)}.."
            f"{format(spread['max'], fmt)})")


def table_rows(result: dict) -> list[list[str]]:
    """Header plus one row per variant (and llama.cpp rows when measured)."""
    speed = result.get("speed", {}).get("variants", {})
    accuracy = result.get("accuracy", {})
    header = ["variant", "b1 ms/token", "b1 tok/s", "b1 vs bf16", "batch out tok/s",
              "batch vs bf16"]
    for which in accuracy:
        header += [f"mean |Δlogprob| ({which})", f"top-1 agree % ({which})"]
    rows = [header]
    for name in result["variants"]:
        s = speed.get(name, {})
        row = [name, _cell(s.get("b1_ms_per_token", {}), ".1f"),
               _cell(s.get("b1_tok_s", {}), ".1f"),
               _cell(s.get("b1_speedup_vs_bf16", {}), ".2f"),
               _cell(s.get("batch_tok_s", {}), ".1f"),
               _cell(s.get("batch_speedup_vs_bf16", {}), ".2f")]
        for acc in accuracy.values():
            a = acc["variants"].get(name)
            row += ([f"{a['mean_abs_dlogprob']:.4f}", f"{a['top1_agreement_pct']:.1f}"] if a
                    else ["n/a", "n/a"])
        rows.append(row)
    for name, entry in result.get("speed", {}).get("llama.cpp", {}).items():
        tok_s = entry["tg_tok_s"]
        ms = {"median": 1e3 / tok_s["median"], "min": 1e3 / tok_s["max"],
              "max": 1e3 / tok_s["min"], "runs": [1e3 / x for x in tok_s["runs"]]}
        rows.append([f"llama.cpp {name} (tg{result['speed_options']['b1_input_len']})",
                     _cell(ms, ".1f"), _cell(tok_s, ".1f")] + [""] * (len(header) - 3))
    return rows


def target_lines(result: dict) -> list[str]:
    """The issue's batch-1 targets, each stated as met / not met."""
    speed = result.get("speed", {})
    lines = []
    for name, target in TARGETS.items():
        entry = speed.get("variants", {}).get(name, {}).get("b1_speedup_vs_bf16")
        if entry and entry.get("runs"):
            verdict = "met" if entry["median"] >= target else "not met"
            lines.append(f"{name} batch-1 decode {entry['median']:.3f}x bf16 "
                         f"(target >= {target}x): {verdict}")
    q8 = speed.get("llama.cpp", {}).get("q8_0")
    for name in ("int8-w8a8", "int8-w8a16", "ct-int8"):
        mine = speed.get("variants", {}).get(name, {}).get("b1_tok_s")
        if q8 and mine and mine.get("runs"):
            ratio = mine["median"] / q8["tg_tok_s"]["median"]
            lines.append(f"{name} batch-1 decode {ratio:.3f}x llama.cpp Q8_0 (target >= 1.0x): "
                         f"{'met' if ratio >= 1.0 else 'not met'}")
    return lines


def print_report(result: dict, out=None) -> None:
    out = out or sys.stdout
    rows = table_rows(result)
    print("| " + " | ".join(rows[0]) + " |", file=out)
    print("|" + " --- |" * len(rows[0]), file=out)
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |", file=out)
    if "speed" in result:
        s = result["speed_options"]
        print(f"\nspeed ({result['torch_threads']} threads): {result['speed_models']}, "
              f"{s['rounds']} interleaved rounds, "
              f"median (min..max); batch 1: {s['b1_input_len']} prompt tokens, median decode "
              f"step over {s['b1_iters']} x {s['b1_output_len']} tokens; batch: "
              f"{s['num_prompts']} requests, prompts uniform in {s['input_len_range'][0]}.."
              f"{s['input_len_range'][1]}, {s['output_len']} output tokens each", file=out)
    for which, a in result.get("accuracy", {}).items():
        print(f"accuracy ({which}): {a['model']}; {a['num_prompts']} prompts x "
              f"{a['tokens_per_prompt']} greedy bf16 tokens, teacher-forced ({a['positions']} "
              f"positions); bf16 top-1 logprob mean {a['bf16_mean_top1_logprob']:.2f}; bf16 "
              f"read teacher-forced picks its own greedy token at "
              f"{a['bf16_self_agreement_pct']:.1f}%", file=out)
    others = [r["other_cores"] for v in result.get("speed", {}).get("variants", {}).values()
              for r in v.get("runs", []) if math.isfinite(r.get("other_cores", math.nan))]
    if others:
        print(f"other processes kept {statistics.median(others):.2f} cores busy during a "
              f"median speed run (max {max(others):.2f})", file=out)
    for line in target_lines(result):
        print(line, file=out)
    print(f"load average (1 min) before {result['load_before'][0]:.2f}, after "
          f"{result['load_after'][0]:.2f}", file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="bf16 bench checkpoint (speed); omit to skip speed")
    p.add_argument("--gptq-model", help="gptq-int4 checkpoint of the same shape")
    p.add_argument("--int8-model", help="compressed-tensors int8 checkpoint (adds ct-int8)")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {','.join(BY_NAME)} (default: all whose checkpoint "
                        "is given)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--b1-input-len", type=int, default=128)
    p.add_argument("--b1-output-len", type=int, default=32)
    p.add_argument("--b1-iters", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len-range", type=int, nargs=2, default=[32, 96])
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--llama-bench", help="llama-bench binary (batch-1 tg of the GGUFs below)")
    p.add_argument("--gguf-q8", help="Q8_0 GGUF of the bench model, for --llama-bench")
    p.add_argument("--gguf-bf16", help="bf16 GGUF of the bench model, for --llama-bench")
    p.add_argument("--max-load", type=float, default=None,
                   help="before each run, wait (up to --max-wait s) for a 1-minute load below this")
    p.add_argument("--max-other-cores", type=float, default=None,
                   help="before each run, wait (up to --max-wait s) until other processes use "
                        "at most this many cores; rerun a run during which they used more")
    p.add_argument("--retries", type=int, default=1, help="reruns per run (--max-other-cores)")
    p.add_argument("--max-wait", type=float, default=300.0)
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--acc-prompts", type=int, default=16)
    p.add_argument("--acc-tokens", type=int, default=32)
    p.add_argument("--acc-models", default="fixture,demo",
                   help=f"comma list of {','.join(ACC_MODELS)}")
    p.add_argument("--acc-dir", help="where the accuracy models are written (default: a temp dir)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)

    speed_models = {"bf16": args.model, "gptq": args.gptq_model, "int8": args.int8_model}
    if args.variants:
        variants = [BY_NAME[n] for n in args.variants.split(",")]
    else:
        variants = [v for v in VARIANTS if args.model is None or speed_models[v.checkpoint]]
    if args.model and any(not speed_models[v.checkpoint] for v in variants):
        p.error("a variant's checkpoint was not given (--gptq-model / --int8-model)")
    if "bf16" not in {v.name for v in variants}:
        variants.insert(0, BY_NAME["bf16"])
    result: dict = {"variants": [v.name for v in variants],
                    "descriptions": {v.name: v.description for v in variants},
                    "load_before": list(os.getloadavg())}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.model:
        opts = SpeedOptions(rounds=args.rounds, b1_input_len=args.b1_input_len,
                            b1_output_len=args.b1_output_len, b1_iters=args.b1_iters,
                            num_prompts=args.num_prompts,
                            input_len_range=tuple(args.input_len_range),
                            output_len=args.output_len, max_load=args.max_load,
                            max_wait=args.max_wait, max_other_cores=args.max_other_cores,
                            retries=args.retries)
        llama = None
        if args.llama_bench:
            llama = {"binary": args.llama_bench}
            llama.update({k: v for k, v in (("q8_0", args.gguf_q8), ("bf16", args.gguf_bf16))
                          if v})
        import torch

        result["torch_threads"] = torch.get_num_threads()
        result["speed_models"] = {v.name: speed_models[v.checkpoint] for v in variants}
        result["speed_options"] = vars(opts)
        result["speed"] = run_speed(variants, speed_models, opts, llama, progress=log)
    if not args.no_accuracy:
        if not args.variants and "ct-int8" not in result["variants"]:
            # Accuracy costs seconds: the int8 checkpoint is measured there in any case.
            variants.append(BY_NAME["ct-int8"])
            result["variants"].append("ct-int8")
            result["descriptions"]["ct-int8"] = BY_NAME["ct-int8"].description
        with tempfile.TemporaryDirectory() as tmp:
            root = args.acc_dir or tmp
            result["accuracy"] = {}
            for which in args.acc_models.split(","):
                log(f"accuracy on {which} (checkpoints under {root})")
                result["accuracy"][which] = run_accuracy(
                    variants, accuracy_model(root, which), args.acc_prompts, args.acc_tokens,
                    ACC_MODELS[which])
    result["load_after"] = list(os.getloadavg())
    result["targets"] = target_lines(result)
    print_report(result)
    if args.json:
        from backplane.benchmarks.report import dump_json

        dump_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
