"""`backplane bench consistency`: record greedy outputs, or compare against a recording.

Before an upgrade, ``--save FILE`` runs a fixed set of prompts with greedy
decoding (temperature 0, a fixed number of tokens, EOS ignored so every run
produces the same length) and writes token ids and text, plus the Backplane,
torch and transformers versions, the platform and the config hash. After the
upgrade, ``--against FILE`` reruns the prompts and sampling settings stored in
the file and reports every prompt whose tokens or text differ (first differing
position, both continuations), exiting 1 when any does. Version, platform or
config-hash differences are printed as context, never as failures: the
outputs are what must not change.

CI keeps tests/golden/llama_tiny_greedy.json for the seeded tiny Llama fixture
so that a change that alters numerics fails loudly.
"""

from __future__ import annotations

import argparse
import json
import platform as pyplatform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

FORMAT = "backplane-consistency/1"
DEFAULT_MAX_TOKENS = 16

# Short, varied English (the tiny test tokenizer is trained on English);
# some share prefixes so prefix caching is exercised too.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Write a short story about a robot who learns to paint",
    "Explain how rivers shape valleys",
    "The quick brown fox jumps over",
    "The quick brown fox jumps over the lazy dog while",
    "Hello, how are you? I am",
    "Numbers like one, two, three,",
    "Once upon a time there lived a king who",
)


@dataclass
class Difference:
    """One prompt whose output changed."""

    index: int
    prompt: str
    position: int  # first differing token position
    expected_tokens: list[int]
    actual_tokens: list[int]
    expected_text: str
    actual_text: str

    def describe(self) -> str:
        exp = self.expected_tokens[self.position:self.position + 8]
        act = self.actual_tokens[self.position:self.position + 8]
        return (
            f"prompt {self.index} {self.prompt!r}: first difference at output token "
            f"{self.position}: expected {exp} got {act}\n"
            f"    expected text: {self.expected_text!r}\n"
            f"    actual text:   {self.actual_text!r}"
        )


def register_consistency(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``consistency`` to the ``backplane bench`` subcommands."""
    from backplane.config.cli_args import add_engine_args

    parser = bench_subparsers.add_parser(
        "consistency", help="record greedy outputs (--save) or compare with a recording "
        "(--against) to check that an upgrade did not change numerics",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="FILE", help="write the outputs to FILE (JSON)")
    mode.add_argument("--against", metavar="FILE", help="compare with outputs saved in FILE")
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
        help=f"tokens generated per prompt with --save [default: {DEFAULT_MAX_TOKENS}]",
    )
    add_engine_args(parser)
    parser.set_defaults(func=run)


def library_versions() -> dict[str, str | None]:
    """Versions that can change numerics."""
    from backplane.version import __version__

    out: dict[str, str | None] = {"backplane": __version__, "python": pyplatform.python_version()}
    for lib in ("torch", "transformers", "tokenizers"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def generate_record(llm, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Greedy outputs of ``prompts`` on ``llm`` with everything needed to compare later."""
    from backplane import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(list(prompts), params, use_tqdm=False)
    engine = llm.llm_engine
    config = engine.config
    return {
        "format": FORMAT,
        "versions": library_versions(),
        "platform": engine.platform.name,
        "config_hash": config.compute_hash(),
        "model": config.model_config.model,
        "dtype": str(config.model_config.torch_dtype).removeprefix("torch."),
        "sampling": {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True},
        "results": [
            {
                "prompt": prompt,
                "token_ids": list(out.outputs[0].token_ids),
                "text": out.outputs[0].text,
            }
            for prompt, out in zip(prompts, outputs, strict=True)
        ],
    }


def compare_records(expected: dict[str, Any], actual: dict[str, Any]) -> list[Difference]:
    """Every prompt whose token ids or text differ between two records."""
    diffs = []
    for index, (exp, act) in enumerate(zip(expected["results"], actual["results"], strict=True)):
        if exp["token_ids"] == act["token_ids"] and exp["text"] == act["text"]:
            continue
        position = next(
            (i for i, (a, b) in enumerate(zip(exp["token_ids"], act["token_ids"], strict=False))
             if a != b),
            min(len(exp["token_ids"]), len(act["token_ids"])),
        )
        diffs.append(Difference(index, exp["prompt"], position, exp["token_ids"],
                                act["token_ids"], exp["text"], act["text"]))
    return diffs


def context_changes(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Differences in versions, platform, dtype and config hash (informational)."""
    out = []
    for key in sorted(set(expected.get("versions", {})) | set(actual["versions"])):
        old, new = expected.get("versions", {}).get(key), actual["versions"].get(key)
        if old != new:
            out.append(f"{key}: {old} -> {new}")
    for key in ("platform", "dtype", "config_hash"):
        if expected.get(key) != actual.get(key):
            out.append(f"{key}: {expected.get(key)} -> {actual.get(key)}")
    return out


def dump_record(record: dict[str, Any], path: str) -> None:
    """Write ``record`` as JSON with one result per line, so diffs of a re-recorded file
    show exactly which prompts changed."""
    head = json.dumps({k: v for k, v in record.items() if k != "results"}, indent=1,
                      ensure_ascii=False)
    results = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in record["results"])
    with open(path, "w", encoding="utf-8") as f:
        f.write(head[: head.rindex("}")].rstrip() + ',\n "results": [\n' + results + "\n ]\n}\n")


def load_record(path: str) -> dict[str, Any]:
    """Read and check a file written by ``--save``."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not a `backplane bench consistency --save` file "
            f"(format {record.get('format')!r}, expected {FORMAT!r})"
        )
    return record


def _make_llm(args: argparse.Namespace):
    from backplane import LLM
    from backplane.config.cli_args import engine_args_from_cli

    engine_args = engine_args_from_cli(args)
    kwargs = {k: v for k, v in asdict(engine_args).items() if k != "model"}
    return LLM(engine_args.model, **kwargs)


def run(args: argparse.Namespace) -> int:
    if args.save:
        if args.max_tokens < 1:
            print(f"error: --max-tokens ({args.max_tokens}) must be >= 1", file=sys.stderr)
            return 2
        record = generate_record(_make_llm(args), list(DEFAULT_PROMPTS), args.max_tokens)
        dump_record(record, args.save)
        print(f"saved greedy outputs of {len(record['results'])} prompts to {args.save} "
              f"(config hash {record['config_hash'][:16]})")
        return 0
    try:
        expected = load_record(args.against)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompts = [r["prompt"] for r in expected["results"]]
    actual = generate_record(_make_llm(args), prompts, expected["sampling"]["max_tokens"])
    for line in context_changes(expected, actual):
        print(f"context: {line}")
    diffs = compare_records(expected, actual)
    if not diffs:
        print(f"consistent: all {len(prompts)} prompts produce the recorded outputs")
        return 0
    print(f"INCONSISTENT: {len(diffs)} of {len(prompts)} prompts differ from {args.against}")
    for diff in diffs:
        print(diff.describe())
    return 1
