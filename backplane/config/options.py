"""The table of user-facing engine options: one entry per `EngineArgs` field.

The table is read off the fields' declarations in `EngineArgs` (nothing is
listed twice). Everything that turns user input into `EngineArgs` (CLI flags,
YAML files, ``BACKPLANE_*`` environment variables, ``LLM(**kwargs)``) and the
docs table read it, so an option has one name, one type, one help text and one
set of spellings. The names are vLLM's where vLLM has the same option, so that
a vLLM user's flags and config files keep working.
"""

from __future__ import annotations

import difflib
import functools
import json
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any

# Options of `backplane serve` that may appear in the same YAML file as engine
# options: the engine ignores them, `serve` reads them.
from backplane.config.server_options import SERVER_OPTION_KEYS

__all__ = ["SERVER_OPTION_KEYS"]

# Alternative spellings that are *not* deprecated: vLLM's name for an option
# Backplane names more generally. Both work forever.
ALIASES = {"gpu_memory_utilization": "memory_utilization"}

# BACKPLANE_* variables that are not engine options (read elsewhere); environment
# parsing skips them instead of warning about an unknown option.
NON_OPTION_ENV_VARS = frozenset(
    {"BACKPLANE_LOGGING_LEVEL", "BACKPLANE_PLATFORM", "BACKPLANE_CONFIG", "BACKPLANE_API_KEY",
     "BACKPLANE_PLUGINS", "BACKPLANE_SERVER_DEV_MODE", "BACKPLANE_CONFORMANCE_PLATFORM",
     # Read by the cpu platform plugin.
     "BACKPLANE_CPU_PREPACK", "BACKPLANE_CPU_MALLOC_TUNING", "BACKPLANE_CPU_FUSED_LAYERS",
     "BACKPLANE_CPU_HEAD_QUANTIZATION", "BACKPLANE_CACHE_DIR", "BACKPLANE_CPU_SHM_SLOT_BYTES",
     # Read by the executors of split models (docs/distributed.md).
     "BACKPLANE_WORKER_STARTUP_TIMEOUT", "BACKPLANE_RAY_PLACEMENT_STRATEGY",
     "BACKPLANE_RAY_CPUS_PER_RANK", "BACKPLANE_RAY_PLACEMENT_TIMEOUT"}
)
ENV_PREFIX = "BACKPLANE_"


@dataclass(frozen=True)
class OptionSpec:
    """How one EngineArgs field is spelled, typed and explained.

    Attributes:
        name: the EngineArgs field name (underscores).
        help: one-line description used by ``--help`` and docs/configuration.md.
        section: the EngineConfig section the option ends up in.
        flags: extra CLI spellings besides ``--name-with-dashes``.
        choices: allowed values, when the set is closed.
    """

    name: str
    help: str
    section: str
    flags: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None

    @property
    def flag(self) -> str:
        """The canonical CLI flag, e.g. ``--max-model-len``."""
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        """The environment variable, e.g. ``BACKPLANE_MAX_MODEL_LEN``."""
        return ENV_PREFIX + self.name.upper()


def _declared_options() -> tuple[OptionSpec, ...]:
    """One OptionSpec per EngineArgs field, read from the field's declaration."""
    from backplane.config.engine_args import EngineArgs

    return tuple(
        OptionSpec(
            f.name,
            f.metadata["help"],
            f.metadata["section"],
            flags=f.metadata["flags"],
            choices=f.metadata["choices"],
        )
        for f in fields(EngineArgs)
    )


OPTIONS: tuple[OptionSpec, ...] = _declared_options()

OPTIONS_BY_NAME: dict[str, OptionSpec] = {o.name: o for o in OPTIONS}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def normalize_key(key: str) -> str:
    """``--max-model-len`` / ``max-model-len`` / ``MAX_MODEL_LEN`` -> ``max_model_len``."""
    return str(key).strip().lstrip("-").replace("-", "_").lower()


@functools.cache
def field_types() -> dict[str, Any]:
    """EngineArgs field name -> its resolved annotation."""
    from backplane.config.engine_args import EngineArgs

    return typing.get_type_hints(EngineArgs)


@functools.cache
def field_defaults() -> dict[str, Any]:
    """EngineArgs field name -> default value (MISSING for required fields)."""
    from backplane.config.engine_args import EngineArgs

    out = {}
    for f in fields(EngineArgs):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = MISSING
    return out


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of an annotation like ``int | None``."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        optional = len(non_none) != len(args)
        base = non_none[0] if len(non_none) == 1 else object
        return (typing.get_origin(base) or base), optional
    return (typing.get_origin(annotation) or annotation), False


def option_type(name: str) -> tuple[type, bool]:
    """(value type, accepts None) of an EngineArgs field."""
    return _base_type(field_types()[name])


def coerce_value(name: str, value: Any) -> Any:
    """Convert ``value`` (from YAML, env or CLI) to the type of option ``name``.

    Strings are parsed ("true"/"false", ints, floats, "none", JSON for mappings);
    values of the wrong type raise ValueError naming the option, the value and
    what was expected.
    """
    base, optional = option_type(name)
    spec = OPTIONS_BY_NAME.get(name)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{name}: None is not allowed (expected {base.__name__})")
    try:
        if base is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                out = value.strip().lower() in _TRUE
            elif isinstance(value, int) and value in (0, 1):
                out = bool(value)
            else:
                raise ValueError
        elif base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and name == "optimization_level":
                value = value.strip().upper().removeprefix("O")  # "O2" as on the CLI
            out = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif base is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if hasattr(value, "__dataclass_fields__"):
                from dataclasses import asdict

                value = asdict(value)
            if not isinstance(value, dict):
                raise ValueError
            out = dict(value)
        elif base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            out = str(value)
        elif base is list:
            items = [value] if isinstance(value, str) else list(value)
            if not items or not all(isinstance(v, str) and v for v in items):
                raise ValueError
            out = items
        else:
            out = value
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ValueError(
            f"{name}: {value!r} is not a valid {base.__name__}"
            + (" or None" if optional else "")
        ) from None
    if spec is not None and spec.choices is not None and out not in spec.choices:
        raise ValueError(f"{name}: {out!r} is not one of {list(spec.choices)}")
    return out


def close_matches(key: str, candidates) -> list[str]:
    """Option names that look like a misspelling of ``key``."""
    return difflib.get_close_matches(normalize_key(key), list(candidates), n=3, cutoff=0.6)


def unknown_option_message(key: str, where: str, candidates=None) -> str:
    """``unknown option 'max_modl_len' in FILE; did you mean: max_model_len?``"""
    # Suggest current spellings only, never a deprecated one.
    pool = candidates if candidates is not None else set(OPTIONS_BY_NAME) | set(ALIASES)
    hint = close_matches(key, pool)
    msg = f"unknown option {key!r} in {where}"
    if hint:
        msg += "; did you mean: " + ", ".join(hint) + "?"
    else:
        msg += "; see `backplane serve --help` or docs/configuration.md for the option list"
    return msg


def known_option_names() -> set[str]:
    """Every accepted spelling (fields, aliases, deprecated names), underscore form."""
    from backplane.config.deprecation import DEPRECATED_OPTIONS

    return set(OPTIONS_BY_NAME) | set(ALIASES) | set(DEPRECATED_OPTIONS)

