"""Renamed and removed options: the deprecation table and the code that applies it.

Policy (RELEASE.md): an option that is renamed or removed in release X.Y keeps
working through X.(Y+1) and goes away in X.(Y+2). While it works, its first use
in a process logs a warning and emits a DeprecationWarning that names the
release it goes away in and its replacement. From ``removed_in`` on, using it
is an error that names the replacement, so nobody is left guessing.

Every source of options (CLI, YAML, environment, ``LLM(**kwargs)``) goes through
`resolve_deprecated`, and `backplane config migrate` rewrites files with the
same table.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeprecatedOption:
    """One renamed or removed option.

    Attributes:
        old: the old option name (underscore form).
        new: the option replacing it, or None when it was removed outright.
        deprecated_in: first release that warns.
        removed_in: first release that rejects it.
        reason: why it changed, shown to users.
        transform: converts an old value to the new option's value (default: as is).
        value_type: type of the old option's value, for its hidden CLI flag.
    """

    old: str
    new: str | None
    deprecated_in: str
    removed_in: str
    reason: str
    transform: Callable[[Any], Any] | None = None
    value_type: type = str

    def convert(self, value: Any) -> Any:
        """The old value as the replacement option expects it."""
        return self.transform(value) if self.transform else value

    def replacement_text(self) -> str:
        return (
            f"use {self.new!r} instead" if self.new
            else "it has no replacement and can be deleted"
        )


DEPRECATION_TABLE: tuple[DeprecatedOption, ...] = (
    DeprecatedOption(
        "max_seq_len", "max_model_len", "0.1.0", "0.3.0",
        "one name for the context length, as in vLLM", value_type=int,
    ),
    DeprecatedOption(
        "num_gpu_blocks_override", "num_kv_blocks", "0.1.0", "0.3.0",
        "KV blocks are not GPU specific", value_type=int,
    ),
    DeprecatedOption(
        "kv_cache_space_bytes", "kv_cache_memory_bytes", "0.1.0", "0.3.0",
        "renamed to match vLLM's kv_cache_memory_bytes", value_type=int,
    ),
    DeprecatedOption(
        "swap_space", None, "0.1.0", "0.3.0",
        "preempted requests are recomputed, nothing is swapped to host memory",
        value_type=float,
    ),
    DeprecatedOption(
        "use_v2_block_manager", None, "0.1.0", "0.3.0",
        "there is only one KV block manager", value_type=bool,
    ),
)

DEPRECATED_OPTIONS: dict[str, DeprecatedOption] = {d.old: d for d in DEPRECATION_TABLE}

_warned: set[str] = set()


def current_version() -> Version:
    """The running Backplane version (read at call time so tests can simulate bumps)."""
    from backplane import version

    return Version(version.__version__)


def is_removed(entry: DeprecatedOption, at: Version | None = None) -> bool:
    """Whether ``entry`` is past its removal release at version ``at`` (default: now)."""
    return (at or current_version()) >= Version(entry.removed_in)


def removal_message(entry: DeprecatedOption, where: str) -> str:
    """Error text for an option used at or after its ``removed_in`` release."""
    return (
        f"option {entry.old!r} (in {where}) was removed in Backplane {entry.removed_in} "
        f"({entry.reason}); {entry.replacement_text()}. "
        "`backplane config migrate FILE` rewrites config files."
    )


def warning_message(entry: DeprecatedOption, where: str) -> str:
    """Warning text for an option that still works but is going away."""
    return (
        f"option {entry.old!r} (in {where}) is deprecated since {entry.deprecated_in} and "
        f"will be removed in {entry.removed_in} ({entry.reason}); {entry.replacement_text()}"
    )


def warn_deprecated(entry: DeprecatedOption, where: str) -> None:
    """Warn about ``entry`` once per process (log + DeprecationWarning)."""
    if entry.old in _warned:
        return
    _warned.add(entry.old)
    msg = warning_message(entry, where)
    logger.warning(msg)
    warnings.warn(msg, DeprecationWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which deprecations were already reported (tests, long-lived tools)."""
    _warned.clear()


def resolve_deprecated(
    values: dict[str, Any],
    where: str,
    problems: list[str] | None = None,
    warnings_out: list[str] | None = None,
) -> dict[str, Any]:
    """Rewrite deprecated names in ``values`` (underscore keys) to their replacements.

    Warns once per option while it still works; at/after its removal release the
    option is an error. Errors are appended to ``problems`` when given (so callers
    can report everything at once), otherwise they are raised as one ValueError.
    With ``warnings_out`` the warnings are appended there instead of being
    emitted (for reports such as `backplane config validate`).
    Removed-without-replacement options are dropped.
    """
    out: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in values.items():
        entry = DEPRECATED_OPTIONS.get(key)
        if entry is None:
            out[key] = value
            continue
        if is_removed(entry):
            errors.append(removal_message(entry, where))
            continue
        if warnings_out is not None:
            warnings_out.append(warning_message(entry, where))
        else:
            warn_deprecated(entry, where)
        if entry.new is None:
            continue
        if entry.new in values:
            errors.append(
                f"both {entry.old!r} (deprecated) and {entry.new!r} are set in {where}; "
                f"keep only {entry.new!r}"
            )
            continue
        out[entry.new] = entry.convert(value)
    if errors:
        if problems is None:
            raise ValueError("\n".join(errors))
        problems.extend(errors)
    return out
