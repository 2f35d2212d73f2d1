"""Rewriting config files to the current schema (`backplane config migrate`).

Two kinds of input are accepted, one key at a time:

- an older Backplane file: deprecated names are renamed (or dropped, for
  options removed without replacement) using the deprecation table;
- a vLLM ``serve`` YAML file: options with a Backplane equivalent are mapped
  (most keep their name, since Backplane uses vLLM's spellings; the
  optimization level is read from ``O``, ``optimization-level`` or
  ``compilation-config``), server options (``api-key``, ``host``, ``port``)
  are kept for `backplane serve`, and everything else is listed as unmapped.

Values are kept as written; `backplane config validate` checks them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from backplane.config.configs import QUANTIZATION_METHODS, CompilationConfig
from backplane.config.deprecation import DEPRECATED_OPTIONS, is_removed
from backplane.config.options import (
    ALIASES,
    OPTIONS_BY_NAME,
    SERVER_OPTION_KEYS,
    close_matches,
    normalize_key,
)

# vLLM options with no Backplane equivalent, and why (shown to the user).
VLLM_UNMAPPABLE = {
    "quantization": "only 4-bit gptq/awq checkpoints and int8/fp8 load-time quantization "
                    "are supported (fp8 checkpoints, bitsandbytes, marlin variants, ... are "
                    "not)",
    "disable_log_stats": "statistics are always exported on /metrics",
    "disable_log_requests": "request logging is controlled by BACKPLANE_LOGGING_LEVEL",
    "enable_log_requests": "request logging is controlled by BACKPLANE_LOGGING_LEVEL",
    "max_seq_len_to_capture": "graph capture sizes come from compilation_config",
    "cpu_offload_gb": "weight offloading is not available",
    "guided_decoding_backend": "structured output is not available yet",
    "disable_custom_all_reduce": "collectives are chosen by the platform plugin",
    "task": "vLLM's older spelling; use `runner` (`generate` or `pooling`; `auto` detects "
            "embedding checkpoints)",
    "tokenizer_mode": "tokenizers are always loaded with transformers' fast tokenizer",
    "max_logprobs": "the logprobs limit is not configurable",
}

# vLLM compilation levels/modes -> Backplane optimization level. vLLM's 1 and 2
# compile without its piecewise graphs; 3 is its default of compile + graphs.
_VLLM_COMPILATION_LEVEL_TO_O = {0: 0, 1: 1, 2: 1, 3: 2}
_VLLM_COMPILATION_MODE_NAMES = {
    "NONE": 0, "STOCK_TORCH_COMPILE": 1, "DYNAMO_TRACE_ONCE": 2, "VLLM_COMPILE": 3,
}


@dataclass
class MigrationResult:
    """A migrated config and the account of what happened to each key.

    Attributes:
        options: the migrated mapping (dash-style keys, input order).
        changes: one line per key that was renamed, converted or dropped.
        unmapped: one line per key that has no equivalent (left out of ``options``).
    """

    options: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes or self.unmapped)


def _out_key(name: str) -> str:
    return name.replace("_", "-")


def _parse_mapping(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _as_int(value: Any) -> int | None:
    try:
        return int(str(value).strip().upper().removeprefix("O"))
    except ValueError:
        return None


def _compilation_level(value: Any) -> int | None:
    """vLLM's compilation level / mode, given as a number or a CompilationMode name."""
    if isinstance(value, str) and not value.strip().isdigit():
        return _VLLM_COMPILATION_MODE_NAMES.get(value.strip().upper())
    return _as_int(value)


def _migrate_compilation(key: str, value: Any, result: MigrationResult) -> dict[str, Any]:
    """Options produced by a ``compilation-config`` entry (vLLM's or Backplane's)."""
    value = _parse_mapping(value)
    if not isinstance(value, Mapping):
        level = _as_int(value)
        if level not in _VLLM_COMPILATION_LEVEL_TO_O:
            result.unmapped.append(f"{key}: {value!r} is not a compilation level 0-3")
            return {}
        new = _VLLM_COMPILATION_LEVEL_TO_O[level]
        result.changes.append(f"{key}: {value!r} -> optimization-level: {new}")
        return {"optimization_level": new}
    ours = {f.name for f in fields(CompilationConfig)}
    out: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for sub, subvalue in value.items():
        norm = normalize_key(sub)
        if norm in ours:
            kept[norm] = subvalue
        elif norm in ("level", "mode"):
            level = _compilation_level(subvalue)
            if level in _VLLM_COMPILATION_LEVEL_TO_O:
                out["optimization_level"] = _VLLM_COMPILATION_LEVEL_TO_O[level]
                result.changes.append(
                    f"{key}.{sub}: {subvalue!r} -> optimization-level: "
                    f"{out['optimization_level']}"
                )
            else:
                result.unmapped.append(f"{key}.{sub}: unknown compilation level {subvalue!r}")
        elif norm == "cudagraph_capture_sizes":
            kept["graph_capture_sizes"] = subvalue
            result.changes.append(f"{key}.{sub} -> compilation-config.graph_capture_sizes")
        elif norm == "cudagraph_mode":
            # vLLM's modes: NONE, PIECEWISE, FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE.
            mode = str(subvalue).upper()
            kept["use_graphs"] = mode.startswith("FULL")
            kept["piecewise_graphs"] = "PIECEWISE" in mode
            result.changes.append(
                f"{key}.{sub}: {subvalue!r} -> compilation-config.use_graphs: "
                f"{kept['use_graphs']}, piecewise_graphs: {kept['piecewise_graphs']}")
        else:
            result.unmapped.append(f"{key}.{sub}: no Backplane compilation setting")
    if kept:
        out["compilation_config"] = kept
    return out


def migrate_options(raw: Mapping[str, Any]) -> MigrationResult:
    """Migrate one config mapping (keys in any spelling) to the current schema."""
    result = MigrationResult()
    staged: dict[str, tuple[str, Any]] = {}  # new name -> (origin key, value)

    def put(name: str, value: Any, origin: str) -> None:
        if name in staged:
            prev = staged[name][0]
            result.changes.append(
                f"{origin}: dropped, {name!r} is already set by {prev!r} (kept that value)"
            )
            return
        staged[name] = (origin, value)

    # Current names first, so that a deprecated duplicate loses to them.
    items = sorted(raw.items(), key=lambda kv: normalize_key(kv[0]) in DEPRECATED_OPTIONS)
    for key, value in items:
        norm = normalize_key(key)
        if norm.startswith("no_") and norm[3:] in OPTIONS_BY_NAME:
            negated = not (value is True or str(value).lower() in ("true", "1", "yes", "on"))
            result.changes.append(f"{key}: {value!r} -> {_out_key(norm[3:])}: {negated}")
            put(norm[3:], negated, key)
        elif norm == "quantization" and value not in (None, *QUANTIZATION_METHODS):
            result.unmapped.append(f"{key}: {value!r} is not supported (Backplane runs "
                                   f"{list(QUANTIZATION_METHODS)}; {VLLM_UNMAPPABLE[norm]})")
        elif norm in OPTIONS_BY_NAME and norm != "compilation_config":
            put(norm, value, key)
        elif norm in ALIASES or norm in SERVER_OPTION_KEYS:
            put(norm, value, key)
        elif norm in ("o", "optimization_level"):
            level = _as_int(value)
            result.changes.append(f"{key}: {value!r} -> optimization-level: {level}")
            put("optimization_level", level, key)
        elif norm == "compilation_config":
            for name, val in _migrate_compilation(key, value, result).items():
                put(name, val, key)
        elif norm in DEPRECATED_OPTIONS:
            entry = DEPRECATED_OPTIONS[norm]
            state = "removed" if is_removed(entry) else f"deprecated, removed in {entry.removed_in}"
            if entry.new is None:
                result.changes.append(f"{key}: dropped ({state}: {entry.reason})")
            else:
                result.changes.append(f"{key} -> {_out_key(entry.new)} ({state})")
                put(entry.new, entry.convert(value), key)
        elif norm in VLLM_UNMAPPABLE:
            result.unmapped.append(f"{key}: {VLLM_UNMAPPABLE[norm]}")
        else:
            hint = close_matches(norm, set(OPTIONS_BY_NAME) | set(ALIASES))
            result.unmapped.append(
                f"{key}: no Backplane equivalent"
                + (f" (did you mean {', '.join(map(_out_key, hint))}?)" if hint else "")
            )
    # Back in the input's order.
    order = {normalize_key(k): i for i, k in enumerate(raw)}
    for name, (_origin, value) in sorted(
        staged.items(), key=lambda kv: order.get(normalize_key(kv[1][0]), 0)
    ):
        result.options[_out_key(name)] = value
    renamed_keys = [k for k in raw if normalize_key(k) in OPTIONS_BY_NAME and _out_key(
        normalize_key(k)) != k]
    if renamed_keys:
        result.changes.append(
            "keys written with dashes: " + ", ".join(repr(k) for k in renamed_keys)
        )
    return result


def render_yaml(result: MigrationResult, source: str) -> str:
    """The migrated config as YAML, headed by comments listing unmapped keys."""
    from backplane.version import __version__

    lines = [f"# Migrated by `backplane config migrate` (Backplane {__version__}) from {source}"]
    if result.unmapped:
        lines.append("# Not mapped (no Backplane equivalent):")
        lines += [f"#   {u}" for u in result.unmapped]
    body = yaml.safe_dump(result.options, sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + "\n" + (body if result.options else "{}\n")
