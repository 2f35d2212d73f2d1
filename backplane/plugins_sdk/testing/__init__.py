"""Conformance test kit for platform plugins (a pytest plugin; see `.plugin`).

A plugin author runs, in the plugin's own CI::

    pytest --backplane-platform acme

and gets Backplane's contract checked against the installed plugin: the
descriptor and device runtime, every attention backend against a float64
reference on random paged inputs (prefill, prefill over a cached prefix,
decode, mixed batches, GQA/MQA, several block sizes, padding tokens with slot
-1, a softmax scale other than 1/sqrt(head_size), a sliding window), the
communicator's collectives in a two-process group, graph replay against eager
execution, and config-policy refusals carrying reasons (on
`PlatformConfigView.for_testing` views, as the core calls the policy).

Helpers for writing more tests of the same kind are importable from here:
`PagedAttentionHarness`, `reference_attention`, `tolerance`, `load_platform`;
a policy's own tests build views with `PlatformConfigView.for_testing(...)`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PagedAttentionHarness", "load_platform", "reference_attention", "tolerance"]


def __getattr__(name: str) -> Any:
    # Lazy: the pytest plugin module lives in this package and must not import torch.
    if name in ("PagedAttentionHarness", "reference_attention", "tolerance"):
        from backplane.plugins_sdk.testing import paged

        return getattr(paged, name)
    if name == "load_platform":
        from backplane.plugins_sdk.testing.loading import load_platform

        return load_platform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
