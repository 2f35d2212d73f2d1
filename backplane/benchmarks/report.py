"""Printing benchmark results: a two-column table for people, JSON for machines."""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summarize(values: Sequence[float], percentiles: Iterable[float] = (50, 90, 99)) -> dict:
    """mean, median and the given percentiles of ``values`` (NaN when empty)."""
    out: dict[str, float] = {
        "mean": statistics.fmean(values) if values else math.nan,
        "median": statistics.median(values) if values else math.nan,
    }
    for p in percentiles:
        out[f"p{p:g}"] = percentile(values, p)
    return out


def median_and_range(values: Sequence[float]) -> dict:
    """median, min and max of repeated measurements."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "runs": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.4g}"
    return str(value)


def print_table(title: str, rows: list[tuple[str, Any]], out: TextIO | None = None) -> None:
    """Print ``rows`` of (label, value) under a title, labels left, values right-aligned."""
    out = out or sys.stdout
    width = max([len(label) for label, _ in rows] + [len(title)])
    values = [_fmt(v) for _, v in rows]
    vwidth = max([len(v) for v in values] + [8])
    rule = "=" * (width + vwidth + 3)
    print(rule, file=out)
    print(title.center(len(rule)), file=out)
    print(rule, file=out)
    for (label, _), value in zip(rows, values, strict=True):
        print(f"{label:<{width}}   {value:>{vwidth}}", file=out)
    print(rule, file=out)


def _json_default(obj: Any):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if hasattr(obj, "__dict__"):
        return vars(obj)
    return str(obj)


def _nan_to_none(obj: Any) -> Any:
    # JSON has no NaN; null is what other tools can read.
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def dump_json(result: dict, path: str | None, out: TextIO | None = None) -> None:
    """Write ``result`` as JSON to ``path``, or to ``out`` (stdout) when path is "-" or None."""
    out = out or sys.stdout
    text = json.dumps(_nan_to_none(result), indent=2, default=_json_default)
    if path in (None, "-"):
        print(text, file=out)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
