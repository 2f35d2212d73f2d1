"""The table of user-facing engine options: one entry per `EngineArgs` field.

Everything that turns user input into `EngineArgs` (CLI flags, YAML files,
``BACKPLANE_*`` environment variables, ``LLM(**kwargs)``) reads this table, so an
option has one name, one type, one help text and one set of spellings. The
names are vLLM's where vLLM has the same option, so that a vLLM user's flags and
config files keep working.
"""

from __future__ import annotations

import difflib
import functools
import json
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any

from backplane.config.configs import _DTYPES

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
     "BACKPLANE_CACHE_DIR"}
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


DTYPE_CHOICES = ("auto", *_DTYPES)
EXECUTOR_BACKENDS = ("uni", "mp", "ray", "external_launcher")
TOKENIZER_MODES = ("auto", "slow")

OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("model", "Local model directory (or an already cached hub id).", "model"),
    OptionSpec("tokenizer", "Tokenizer directory; defaults to the model's.", "model"),
    OptionSpec(
        "dtype",
        "Weight and activation dtype; 'auto' takes the checkpoint's dtype when the "
        "platform supports it, else the platform default.",
        "model",
        choices=DTYPE_CHOICES,
    ),
    OptionSpec(
        "max_model_len",
        "Longest prompt + output in tokens; defaults to the model's max_position_embeddings.",
        "model",
    ),
    OptionSpec("seed", "Seed for requests that set none.", "model"),
    OptionSpec(
        "served_model_name",
        "Name(s) the server answers to (several allowed; the first is reported in "
        "responses); defaults to --model.",
        "model",
    ),
    OptionSpec(
        "trust_remote_code", "Allow model code shipped with the checkpoint to run.", "model"
    ),
    OptionSpec(
        "tokenizer_mode",
        "'auto' (the fast tokenizer when there is one) or 'slow' (the Python one).",
        "model",
        choices=TOKENIZER_MODES,
    ),
    OptionSpec(
        "hf_overrides",
        "JSON mapping of attributes to set on the model's Hugging Face config after reading "
        "it (e.g. '{\"max_position_embeddings\": 4096}').",
        "model",
    ),
    OptionSpec(
        "max_logprobs",
        "Most logprobs (and prompt_logprobs) a request may ask for per position; -1: the "
        "whole vocabulary.",
        "model",
    ),
    OptionSpec(
        "revision",
        "Model revision on the Hugging Face Hub; refused: Backplane loads local "
        "directories (check out the revision first).",
        "model",
    ),
    OptionSpec(
        "max_seq_len_to_capture",
        "vLLM's graph-capture length limit; refused: the model runner does not capture "
        "graphs yet.",
        "model",
    ),
    OptionSpec(
        "download_dir",
        "Where to download weights; refused: Backplane never downloads, pass a local "
        "model directory.",
        "load",
    ),
    OptionSpec("block_size", "Tokens per KV-cache block.", "cache"),
    OptionSpec(
        "enable_prefix_caching", "Reuse KV blocks of identical prompt prefixes.", "cache"
    ),
    OptionSpec(
        "memory_utilization",
        "Fraction of the device memory the KV cache may take "
        "(vLLM spelling --gpu-memory-utilization works too).",
        "cache",
        flags=("--gpu-memory-utilization",),
    ),
    OptionSpec(
        "kv_cache_memory_bytes",
        "Explicit KV-cache size in bytes; overrides --memory-utilization.",
        "cache",
    ),
    OptionSpec(
        "num_kv_blocks", "Explicit number of KV blocks; overrides both sizes above.", "cache"
    ),
    OptionSpec(
        "kv_cache_dtype", "KV-cache storage dtype; 'auto' uses the model dtype.", "cache"
    ),
    OptionSpec("max_num_seqs", "Most requests running in one step.", "scheduler"),
    OptionSpec(
        "max_num_batched_tokens",
        "Token budget of one step (prompt and output tokens alike).",
        "scheduler",
    ),
    OptionSpec(
        "enable_chunked_prefill", "Split long prompts over several steps.", "scheduler"
    ),
    OptionSpec(
        "scheduling_policy",
        "'fcfs' (arrival order) or 'priority' (lower priority value first).",
        "scheduler",
        choices=("fcfs", "priority"),
    ),
    OptionSpec(
        "tensor_parallel_size", "Devices one layer is split over.", "parallel", flags=("-tp",)
    ),
    OptionSpec(
        "pipeline_parallel_size", "Pipeline stages the layers are split into.", "parallel",
        flags=("-pp",),
    ),
    OptionSpec(
        "distributed_executor_backend",
        "How worker processes are run.",
        "parallel",
        choices=EXECUTOR_BACKENDS,
    ),
    OptionSpec(
        "device",
        "Platform plugin to run on ('auto' picks the best available one).",
        "device",
    ),
    OptionSpec(
        "attention_backend", "Force an attention backend of the platform by name.", "device"
    ),
    OptionSpec("load_format", "How weights are read.", "load"),
    OptionSpec(
        "optimization_level",
        "0: eager; 1: torch.compile; 2: compile + graph capture; 3: same as 2. "
        "Default: the platform's (graph platforms 2, cpu 0).",
        "compilation",
        flags=("-O",),
        choices=(0, 1, 2, 3),
    ),
    OptionSpec("enforce_eager", "Never compile or capture graphs (same as -O0).", "compilation"),
    OptionSpec(
        "compilation_config",
        "Explicit compilation settings as JSON/mapping (compile, backend, use_graphs, "
        "graph_capture_sizes); they win over the optimization level's defaults.",
        "compilation",
        flags=("-cc",),
    ),
)

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
