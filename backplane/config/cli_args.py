"""Engine options as command-line flags (vLLM's spellings), and back to EngineArgs.

Every flag's default is ``argparse.SUPPRESS``: a flag the user did not type is
absent from the namespace, so it cannot override the config file or the
environment (see `backplane.config.sources` for the precedence order).
"""

from __future__ import annotations

import argparse
from typing import Any

from backplane.config.deprecation import DEPRECATION_TABLE
from backplane.config.engine_args import EngineArgs
from backplane.config.options import OPTIONS, coerce_value, field_defaults, option_type
from backplane.config.sources import engine_args_from_sources

_SECTION_TITLES = {
    "model": "model",
    "cache": "KV cache",
    "scheduler": "scheduler",
    "parallel": "parallelism",
    "device": "platform",
    "load": "weights",
    "compilation": "optimization level and compilation",
    "speculative": "speculative decoding",
    "lora": "LoRA adapters",
}


def _typed(name: str):
    """argparse ``type=`` callable that converts with the option's own rules."""

    def convert(text: str) -> Any:
        try:
            return coerce_value(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in its own errors
    return convert


def add_engine_args(
    parser: argparse.ArgumentParser, positional_model: bool = False
) -> argparse.ArgumentParser:
    """Add one flag per EngineArgs field (plus ``--config`` and hidden deprecated flags).

    Args:
        parser: the (sub)command parser to extend.
        positional_model: also accept the model as an optional positional
            argument (``backplane serve MODEL``), stored as ``model_tag``.

    Returns the parser. Parse, then call `engine_args_from_cli`.
    """
    if positional_model:
        parser.add_argument(
            "model_tag", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
            help="model directory (same as --model)",
        )
    parser.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
        help="YAML file of options (keys are flag names, dashes or underscores); "
        "flags and BACKPLANE_* variables override it",
    )
    defaults = field_defaults()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in OPTIONS:
        group = groups.get(spec.section)
        if group is None:
            group = groups[spec.section] = parser.add_argument_group(
                _SECTION_TITLES.get(spec.section, spec.section)
            )
        base, _ = option_type(spec.name)
        default = defaults[spec.name]
        help_text = spec.help
        if default is not None and default.__class__ in (int, float, str, bool):
            help_text += f" [default: {default}]"
        names = [spec.flag, *spec.flags]
        if spec.name == "optimization_level":
            names = ["-O", "--optimization-level"]
        if base is bool:
            group.add_argument(
                *names, dest=spec.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )
        elif base is list:
            group.add_argument(
                *names, dest=spec.name, nargs="+", default=argparse.SUPPRESS, help=help_text,
                metavar=spec.name.upper(),
            )
        else:
            group.add_argument(
                *names, dest=spec.name, type=_typed(spec.name), default=argparse.SUPPRESS,
                choices=spec.choices, help=help_text,
                metavar=None if spec.choices else spec.name.upper(),
            )
    for entry in DEPRECATION_TABLE:
        flag = "--" + entry.old.replace("_", "-")
        if entry.value_type is bool:
            parser.add_argument(
                flag, dest=entry.old, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=argparse.SUPPRESS,
            )
        else:
            parser.add_argument(
                flag, dest=entry.old, type=entry.value_type, default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
    return parser


def engine_args_from_cli(args: argparse.Namespace, **kwargs: Any) -> EngineArgs:
    """EngineArgs from a namespace parsed with `add_engine_args`.

    Honours ``--config`` and ``BACKPLANE_*`` variables with the documented
    precedence; extra ``kwargs`` (e.g. forced by a subcommand) rank with the flags.
    """
    return engine_args_from_sources(cli=args, kwargs=kwargs or None)
