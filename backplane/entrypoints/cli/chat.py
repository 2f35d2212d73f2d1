"""`backplane chat`: an interactive chat in the terminal, replies streamed as generated.

Reads one user message per line from stdin. ``/exit`` (or end of input)
quits, ``/reset`` forgets the conversation. The conversation goes through the
model's chat template (or ``--chat-template FILE``); replies are capped at
``--max-tokens`` and by what is left of max_model_len.
"""

from __future__ import annotations

import argparse
import sys

from backplane.entrypoints.cli.generate import (
    add_sampling_args,
    build_engine,
    sampling_params_from_args,
    stream_text,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``chat`` subcommand."""
    from backplane.config.cli_args import add_engine_args

    parser = subparsers.add_parser("chat", help="chat with a model in the terminal")
    parser.add_argument("--system", default=None, help="system message starting the conversation")
    parser.add_argument(
        "--chat-template",
        dest="chat_template",
        default=None,
        metavar="FILE",
        help="Jinja chat template file overriding the tokenizer's",
    )
    add_sampling_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=run)


def _render(engine, messages: list[dict], template: str | None) -> list[int]:
    tok = engine.tokenizer
    text = tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    return list(tok(text, add_special_tokens=False).input_ids)


def run(args: argparse.Namespace) -> int:
    """The read-reply loop."""
    interactive = sys.stdin.isatty()
    try:
        sampling_params_from_args(args)  # fail on bad flags before loading the model
        engine = build_engine(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"backplane chat: error: {exc}", file=sys.stderr)
        return 2
    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    if template is None and not getattr(engine.tokenizer, "chat_template", None):
        print(
            "backplane chat: error: the model has no chat template; pass --chat-template FILE "
            "or use `backplane generate`",
            file=sys.stderr,
        )
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        print("Chatting with the model; /exit quits, /reset starts over.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": text})
        prompt_ids = _render(engine, messages, template)
        room = engine.max_model_len - len(prompt_ids)
        if room < 1:
            print(
                f"[the conversation ({len(prompt_ids)} tokens) fills max_model_len "
                f"({engine.max_model_len}); /reset to start over]",
                file=sys.stderr,
            )
            messages.pop()
            continue
        params = sampling_params_from_args(args, max_tokens=min(args.max_tokens, room))
        if interactive:
            sys.stdout.write("assistant> ")
        reply = []
        try:
            for piece in stream_text(engine, prompt_ids, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this reply, keep chatting
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
