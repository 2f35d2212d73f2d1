"""Checking a config file against the current schema (`backplane config validate`).

Every problem is collected and reported together: unknown keys (with close
matches), bad values, removed options, conflicting settings, and what the
platform refuses. Model-dependent checks (heads vs tensor parallel size,
attention backend, max_model_len vs the model's limit) run when the model
directory exists; otherwise they are skipped and the report says so.
Environment variables are not applied: the file is judged on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from backplane.config.engine_args import EngineArgs
from backplane.config.sources import normalize_options, read_yaml_file


@dataclass
class ValidationReport:
    """Outcome of validating one config.

    Attributes:
        errors: problems that make the config unusable.
        warnings: deprecated options that still work.
        notes: defaults chosen and explicit settings that won over them.
        model_checked: whether the model-dependent checks ran.
        platform: the platform the config was checked against.
        config_hash: `EngineConfig.compute_hash()` when the full check passed.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_checked: bool = False
    platform: str | None = None
    config_hash: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
            "notes": self.notes, "model_checked": self.model_checked,
            "platform": self.platform, "config_hash": self.config_hash,
        }


def validate_options(
    raw: dict[str, Any], where: str, check_model: bool = True, platform=None
) -> ValidationReport:
    """Validate one mapping of options (any spelling) as `backplane serve` would use it."""
    report = ValidationReport()
    options = normalize_options(raw, where, problems=report.errors, warnings_out=report.warnings)
    if "model" not in options and not any(
        str(k).replace("-", "_").lower() in ("model", "model_tag") for k in raw
    ):
        # Allowed: serve files often leave the model to the command line.
        report.warnings.append(
            f"{where}: 'model' is not set; it must then be given on the command line"
        )
        options["model"] = ""
    try:
        config = EngineArgs(**options).create_engine_config()
    except (TypeError, ValueError) as exc:
        report.errors.append(f"{where}: {exc}")
        return report
    if platform is None:
        try:
            from backplane.platforms import resolve_platform

            platform = resolve_platform(config.device_config.device)
        except Exception as exc:  # noqa: BLE001 - reported with the rest
            report.errors.append(f"device {config.device_config.device!r}: {exc}")
            report.errors += config.problems()
            return report
    report.platform = platform.name
    model = config.model_config.model
    report.model_checked = check_model and bool(model) and os.path.isdir(model)
    if check_model and model and not report.model_checked:
        report.notes.append(
            f"model {model!r} is not a local directory here: model-dependent checks "
            "(heads vs tensor_parallel_size, attention backend, max_model_len limit) skipped"
        )
    report.errors += config.check(platform, load_model=report.model_checked)
    report.notes += config.notes
    if report.ok and report.model_checked:
        report.config_hash = config.compute_hash()
    report.errors = list(dict.fromkeys(report.errors))
    return report


def validate_config_file(path: str, check_model: bool = True, platform=None) -> ValidationReport:
    """Validate a YAML config file; see `validate_options`."""
    try:
        raw = read_yaml_file(path)
    except (OSError, ValueError) as exc:
        return ValidationReport(errors=[str(exc)])
    return validate_options(raw, f"config file {path!r}", check_model, platform)
