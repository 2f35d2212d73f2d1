"""`backplane bench speculative`: decode speed with and without speculative decoding.

Requests run ``batch_size`` at a time (1: single-stream latency, where
speculation helps most) through one engine per configuration: first without
speculation, then with each ``--speculative-config``. Per configuration: output
tokens/s, speed-up, acceptance rate, mean accepted length (tokens per
verification step), acceptance per draft position, and the break-even length:
a verification step's time divided by a plain decode step's. Speculation pays
when the mean accepted length is above it.

Workloads: ``copy`` prompts hold a passage twice and the start of a third copy,
so a model that copies (any trained LM does) repeats text prompt lookup can
predict; ``random`` prompts are random token ids (free generation).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import statistics
from dataclasses import dataclass
from typing import Any

from backplane.benchmarks.engine_runner import create_engine, run_requests, warm_up
from backplane.benchmarks.report import dump_json, print_table
from backplane.benchmarks.workload import BenchRequest, token_id_range

# English passages for the copy workload (the prompt repeats one; the answer copies it).
PASSAGES = [
    "In the beginning the quiet town by the river woke slowly, the bakers lit their ovens, "
    "and the first boats pushed away from the shore while the bells rang for the morning.",
    "And he said to them, go into the city and tell the elders what you have seen, for the "
    "day is near when every house will hear the news and the gates will be opened.",
    "The engine turned over twice, coughed, and then settled into a steady rhythm as the "
    "driver checked the mirrors and pulled out onto the long road that led to the coast.",
    "She wrote the numbers in the ledger one by one, checked each column twice, and closed "
    "the book only when every sum agreed with the receipts kept in the drawer.",
]
WORKLOADS = ("copy", "random")


@dataclass
class SpeculativeBenchOptions:
    """What `bench speculative` measures."""

    engine_args: Any  # backplane.config.EngineArgs (its speculative_config is one candidate)
    extra_configs: list[dict]
    workload: str = "copy"
    num_prompts: int = 4
    output_len: int = 128
    input_len: int = 128  # random workload only
    batch_size: int = 1
    temperature: float = 0.0
    progress: bool = True

    def validate(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload ({self.workload!r}) is not one of {list(WORKLOADS)}")
        for name in ("num_prompts", "output_len", "input_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1")

    def configs(self) -> list[dict | None]:
        """None (no speculation) first, then every configuration to compare."""
        own = self.engine_args.speculative_config
        return [None] + ([own] if own else []) + list(self.extra_configs)


def _requests(options: SpeculativeBenchOptions, engine) -> list[BenchRequest]:
    rng = random.Random(0)
    requests = []
    for i in range(options.num_prompts):
        if options.workload == "copy":
            passage = PASSAGES[i % len(PASSAGES)]
            words = passage.split()
            text = f"{passage}\n{passage}\n{' '.join(words[: len(words) // 4])}"
            ids = engine.tokenizer.encode(text)
        else:
            low, high = token_id_range(engine.tokenizer)
            ids = [rng.randrange(low, high) for _ in range(options.input_len)]
        requests.append(BenchRequest(f"spec-{i}", ids, options.output_len))
    return requests


def _label(config: dict | None) -> str:
    if config is None:
        return "no speculation"
    shown = {k: v for k, v in config.items() if k not in ("model",)}
    if config.get("model"):
        shown["model"] = config["model"].rstrip("/").rsplit("/", 1)[-1]
    return json.dumps(shown, separators=(",", ":"))


def measure(options: SpeculativeBenchOptions) -> dict:
    """Run every configuration on the same requests; returns the JSON-ready result."""
    options.validate()
    results = []
    for config in options.configs():
        args = dataclasses.replace(options.engine_args, speculative_config=config)
        engine = create_engine(args)
        try:
            low, high = token_id_range(engine.tokenizer)
            warm_up(engine, low, high)
            requests = _requests(options, engine)
            seconds, tokens, step_times = 0.0, 0, []
            before = engine.get_stats().spec_decode or {}
            for start in range(0, len(requests), options.batch_size):
                run = run_requests(engine, requests[start : start + options.batch_size],
                                   options.temperature, progress=options.progress,
                                   desc=_label(config)[:40])
                seconds += run.seconds
                tokens += run.output_tokens
                step_times += [s.seconds for s in run.steps]
            after = engine.get_stats().spec_decode or {}
        finally:
            engine.shutdown()
            del engine
            gc.collect()
        row = {"config": _label(config), "output_tokens": tokens, "seconds": seconds,
               "output_tokens_per_s": tokens / seconds,
               "median_step_ms": 1000 * statistics.median(step_times)}
        if config is not None:
            drafts = after.get("num_drafts", 0) - before.get("num_drafts", 0)
            drafted = after.get("num_draft_tokens", 0) - before.get("num_draft_tokens", 0)
            accepted = after.get("num_accepted_tokens", 0) - before.get("num_accepted_tokens", 0)
            per_position = [a - b for a, b in zip(
                after.get("accepted_per_position", []),
                before.get("accepted_per_position", []) + [0] * options.output_len,
                strict=False)]
            row.update(
                acceptance_rate=accepted / drafted if drafted else 0.0,
                mean_accepted_length=1 + accepted / drafts if drafts else 1.0,
                acceptance_per_position=[round(a / drafts, 3) for a in per_position]
                if drafts else [])
        results.append(row)
    base = results[0]
    for row in results[1:]:
        row["speedup"] = row["output_tokens_per_s"] / base["output_tokens_per_s"]
        row["break_even_length"] = row["median_step_ms"] / base["median_step_ms"]
    return {"workload": options.workload, "batch_size": options.batch_size,
            "num_prompts": options.num_prompts, "output_len": options.output_len,
            "temperature": options.temperature, "model": options.engine_args.model,
            "results": results}


def main(args) -> int:
    from backplane.config.cli_args import engine_args_from_cli

    extra = [json.loads(text) for text in args.extra_speculative_config or []]
    options = SpeculativeBenchOptions(
        engine_args=engine_args_from_cli(args), extra_configs=extra,
        workload=args.workload, num_prompts=args.num_prompts, output_len=args.output_len,
        input_len=args.input_len, batch_size=args.batch_size, temperature=args.temperature,
        progress=not args.no_progress)
    result = measure(options)
    for row in result["results"]:
        rows = [(k, v) for k, v in row.items() if k != "config"]
        print_table(f"bench speculative ({result['workload']}, batch {result['batch_size']}): "
                    f"{row['config']}", rows)
    if args.json:
        dump_json(result, args.json)
    return 0
