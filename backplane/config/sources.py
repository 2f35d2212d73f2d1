"""Building EngineArgs from every source of options, with one precedence order.

Precedence, lowest to highest (documented in docs/configuration.md):

1. EngineArgs defaults
2. the YAML file (``--config FILE``, ``config=`` keyword, or ``BACKPLANE_CONFIG``)
3. ``BACKPLANE_*`` environment variables (``BACKPLANE_MAX_MODEL_LEN=4096``)
4. CLI flags and Python keyword arguments (only those given explicitly;
   keywords are applied after flags when a caller passes both)

Every source accepts the same names: EngineArgs fields with dashes or
underscores, the non-deprecated aliases (``gpu_memory_utilization``) and
deprecated names while they still work. Problems of one source are collected
and raised as one ValueError.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import MISSING
from typing import Any

import yaml

from backplane.config.deprecation import resolve_deprecated
from backplane.config.engine_args import EngineArgs
from backplane.config.options import (
    ALIASES,
    ENV_PREFIX,
    NON_OPTION_ENV_VARS,
    OPTIONS_BY_NAME,
    SERVER_OPTION_KEYS,
    close_matches,
    coerce_value,
    field_defaults,
    known_option_names,
    normalize_key,
    unknown_option_message,
)

logger = logging.getLogger(__name__)

CONFIG_ENV_VAR = "BACKPLANE_CONFIG"


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, keys as written.

    Raises FileNotFoundError / ValueError naming the file for a missing file,
    a syntax error, or a top level that is not a mapping.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path!r} must be a mapping of option: value, got {type(data).__name__}"
        )
    return {str(k): v for k, v in data.items()}


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict with normalized (underscore) keys.

    Includes server options (``port``, ``api_key``...) as well as engine
    options; `backplane serve` reads the former from here. Raises ValueError
    naming the file for syntax errors, a non-mapping top level, or a key given
    twice in different spellings.
    """
    out: dict[str, Any] = {}
    for key, value in read_yaml_file(path).items():
        norm = normalize_key(key)
        if norm in out:
            raise ValueError(f"config file {os.fspath(path)!r} sets {norm!r} twice ({key!r})")
        out[norm] = value
    return out


def normalize_options(
    raw: Mapping[str, Any],
    where: str,
    *,
    extra_keys: frozenset[str] | set[str] = SERVER_OPTION_KEYS,
    problems: list[str] | None = None,
    warnings_out: list[str] | None = None,
) -> dict[str, Any]:
    """Turn one source's raw options into typed EngineArgs field values.

    Normalizes spellings, resolves aliases and deprecated names, drops keys in
    ``extra_keys`` (options of other components, e.g. the server's ``port``) and
    converts values to the fields' types. Unknown keys and bad values are
    collected: appended to ``problems`` when given, else raised as one ValueError.
    Deprecation warnings go to ``warnings_out`` when given, else are emitted.
    """
    errors: list[str] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        norm = normalize_key(key)
        if norm in extra_keys or norm == "config":
            continue
        if norm.startswith("no_") and norm[3:] in OPTIONS_BY_NAME:
            # `no-enable-prefix-caching: true` as written by vLLM-style files.
            try:
                value = not coerce_value(norm[3:], value)
                norm = norm[3:]
            except ValueError as exc:
                errors.append(f"{where}: {exc}")
                continue
        norm = ALIASES.get(norm, norm)
        if norm not in known_option_names():
            errors.append(unknown_option_message(key, where))
            continue
        if norm in values:
            errors.append(f"{where}: {norm!r} is given twice (also as an alias)")
            continue
        values[norm] = value
    values = resolve_deprecated(values, where, errors, warnings_out)
    typed: dict[str, Any] = {}
    for name, value in values.items():
        try:
            typed[name] = coerce_value(name, value)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
    if errors:
        if problems is None:
            raise ValueError("\n".join(errors))
        problems.extend(errors)
    return typed


def options_from_env(env: Mapping[str, str], problems: list[str] | None = None) -> dict[str, Any]:
    """Engine options set through ``BACKPLANE_<OPTION>`` environment variables.

    Variables that are not options (``BACKPLANE_LOGGING_LEVEL``...) are skipped;
    an unknown ``BACKPLANE_*`` variable only logs a warning (with close matches),
    since the environment is shared with other tools.
    """
    raw = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in NON_OPTION_ENV_VARS:
            continue
        name = normalize_key(var[len(ENV_PREFIX):])
        if ALIASES.get(name, name) in known_option_names():
            raw[name] = value
        else:
            hint = close_matches(name, set(OPTIONS_BY_NAME) | set(ALIASES))
            logger.warning(
                "environment variable %s is not a Backplane option%s", var,
                f" (did you mean {', '.join(ENV_PREFIX + h.upper() for h in hint)}?)"
                if hint else "",
            )
    return normalize_options(raw, "environment", problems=problems)


def options_from_cli(cli: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Raw options the user gave on the command line.

    Expects a namespace from a parser built with `add_engine_args` (whose
    defaults are SUPPRESS, so absent flags are absent attributes). Attributes
    that are not engine options (subcommand, port...) are ignored.
    """
    items = vars(cli) if isinstance(cli, argparse.Namespace) else dict(cli)
    raw = {k: v for k, v in items.items() if k in known_option_names()}
    positional = items.get("model_tag")
    if positional is not None:
        if "model" in raw and raw["model"] != positional:
            raise ValueError(
                f"model given twice: positional {positional!r} and --model {raw['model']!r}"
            )
        raw["model"] = positional
    return raw


def engine_args_from_sources(
    cli: argparse.Namespace | Mapping[str, Any] | None = None,
    yaml_path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = os.environ,
    kwargs: Mapping[str, Any] | None = None,
    *,
    extra_keys: frozenset[str] | set[str] = SERVER_OPTION_KEYS,
) -> EngineArgs:
    """EngineArgs from defaults < YAML < environment < CLI flags / keyword arguments.

    Args:
        cli: parsed CLI namespace (see `add_engine_args`) or a mapping of given flags.
        yaml_path: config file; if None, ``cli.config``, ``kwargs['config']`` or
            ``$BACKPLANE_CONFIG`` is used when set.
        env: environment to read ``BACKPLANE_*`` from; None to ignore the environment.
        kwargs: Python keyword arguments (``LLM(**kwargs)``).
        extra_keys: keys allowed in the YAML file that are not engine options
            (default: the server's, see `SERVER_OPTION_KEYS`).

    Raises:
        ValueError listing every problem (unknown keys with close matches, bad
        values, removed options) of all sources at once.
    """
    problems: list[str] = []
    kwargs = dict(kwargs or {})
    cli_raw = options_from_cli(cli) if cli is not None else {}
    if yaml_path is None:
        yaml_path = (
            (vars(cli).get("config") if isinstance(cli, argparse.Namespace) else None)
            or kwargs.pop("config", None)
            or (env or {}).get(CONFIG_ENV_VAR)
        )
    kwargs.pop("config", None)

    merged: dict[str, Any] = {}
    if yaml_path:
        merged.update(
            normalize_options(
                read_yaml_file(yaml_path), f"config file {os.fspath(yaml_path)!r}",
                extra_keys=extra_keys, problems=problems,
            )
        )
    if env is not None:
        merged.update(options_from_env(env, problems))
    merged.update(normalize_options(cli_raw, "command line", problems=problems))
    merged.update(
        # A server option passed to LLM(...) would do nothing: reject it like any unknown name.
        normalize_options(kwargs, "keyword arguments", extra_keys=frozenset(), problems=problems)
    )
    if "model" not in merged:
        problems.append(
            "model is required: pass --model (or MODEL to `serve`), `model:` in the config "
            "file, BACKPLANE_MODEL, or LLM(model=...)"
        )
    if problems:
        raise ValueError("invalid options:\n  - " + "\n  - ".join(problems))
    return EngineArgs(**merged)


def engine_args_to_dict(args: EngineArgs, only_changed: bool = True) -> dict[str, Any]:
    """EngineArgs as a YAML-ready mapping (dash keys), by default only non-default fields."""
    defaults = field_defaults()
    out = {}
    for name in OPTIONS_BY_NAME:
        value = getattr(args, name)
        if only_changed and defaults[name] is not MISSING and value == defaults[name]:
            continue
        out[name.replace("_", "-")] = value
    return out
