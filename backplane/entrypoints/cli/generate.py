"""`backplane generate "PROMPT"`: complete one prompt from the terminal, streaming the text.

Takes every engine flag (``--model``, ``--device``, ``--max-model-len``...;
without ``--model`` the bundled demo model is used) plus sampling flags.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator

# Terminal defaults: a little less random than SamplingParams' temperature 1.0.
DEFAULT_MAX_TOKENS = 128
DEFAULT_TEMPERATURE = 0.7


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    from backplane.config.cli_args import add_engine_args

    parser = subparsers.add_parser(
        "generate", help="complete one prompt and print the text as it is generated"
    )
    parser.add_argument("prompt", help="the prompt text")
    add_sampling_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=run)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Sampling flags shared by ``generate`` and ``chat`` (the engine's --seed seeds sampling)."""
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"most tokens to generate [default: {DEFAULT_MAX_TOKENS}]",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"0 is greedy [default: {DEFAULT_TEMPERATURE}]",
    )
    group.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass [default: 1.0]"
    )
    group.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all"
    )
    group.add_argument(
        "--min-p", type=float, default=0.0, help="minimum probability relative to the best"
    )
    group.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeating tokens [default: 1.0]",
    )
    group.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop when this text is generated (repeatable)",
    )
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")


def sampling_params_from_args(args: argparse.Namespace, max_tokens: int | None = None):
    """SamplingParams from the sampling flags (ValueError names a bad field)."""
    from backplane.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def build_engine(args: argparse.Namespace):
    """An LLMEngine from the engine flags; the demo model when no model is given."""
    from backplane.config.cli_args import engine_args_from_cli
    from backplane.core.engine.llm_engine import LLMEngine

    try:
        engine_args = engine_args_from_cli(args)
    except ValueError as exc:
        if "model is required" not in str(exc):
            raise
        from backplane.entrypoints.cli.serve import demo_model_path

        engine_args = engine_args_from_cli(args, model=demo_model_path())
    return LLMEngine.from_engine_args(engine_args)


_request_counter = itertools.count()


def stream_text(engine, prompt: str | list[int], params) -> Iterator[str]:
    """Run one request to completion, yielding its text as it grows (n=1).

    The request is aborted if the caller stops early (e.g. Ctrl-C).
    """
    request_id = f"cli-{next(_request_counter)}"
    engine.add_request(request_id, prompt, params)
    sent = 0
    finished = False
    try:
        while not finished and engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                text = out.outputs[0].text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                finished = out.finished
    finally:
        if not finished:
            engine.abort_request([request_id])


def run(args: argparse.Namespace) -> int:
    """Print the completion of ``args.prompt``."""
    try:
        params = sampling_params_from_args(args)
        engine = build_engine(args)
        for piece in stream_text(engine, args.prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"backplane generate: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0
