"""Conformance: the config policy accepts defaults and refuses with reasons.

The policy gets a `PlatformConfigView`, as the core hands it over
(`ConfigPolicy.check_and_update`); nothing here builds an engine config.
"""

from __future__ import annotations

import pytest
import torch

from backplane.plugins_sdk.attention import AttentionSpec
from backplane.plugins_sdk.config_view import PlatformConfigView
from backplane.plugins_sdk.platform import LEGACY_CONFIG_HOOK, run_config_policy

pytestmark = pytest.mark.backplane_conformance


def _decide(platform, **overrides):
    """(view, decision) of the platform's policy on a small Llama-shaped model's view."""
    policy = platform.config_policy
    if LEGACY_CONFIG_HOOK.implements_only_old(policy):
        pytest.skip(f"{type(policy).__qualname__} implements only the deprecated "
                    "check_and_update_config(config) (removed in SDK "
                    f"{LEGACY_CONFIG_HOOK.deprecation.removed_in}); implement "
                    "check_and_update(view: PlatformConfigView) to run the config checks")
    fields = {"dtype": platform.runtime.default_dtype(), "max_num_batched_tokens": 256}
    view = PlatformConfigView.for_testing(**(fields | overrides))
    decision = run_config_policy(policy, view)
    assert isinstance(decision.changes, list) and isinstance(decision.refusals, list)
    for text in decision.changes + decision.refusals:
        assert isinstance(text, str) and text.strip(), f"empty reason in {decision}"
    return view, decision


def test_config_policy_accepts_defaults(backplane_platform):
    _, decision = _decide(backplane_platform)
    assert not decision.refusals, f"default config refused: {decision.refusals}"


def test_config_policy_changes_are_reported(backplane_platform):
    view, decision = _decide(backplane_platform)
    if view.updates():
        assert decision.changes, (
            f"the policy changed {sorted(view.updates())} without a reason in "
            "ConfigDecision.changes")


def test_config_policy_refuses_graphs_without_runner(backplane_platform):
    if backplane_platform.supports_graph_capture:
        pytest.skip("platform captures graphs; nothing to refuse")
    _, decision = _decide(backplane_platform, use_graphs=True, graph_capture_sizes=(1, 2, 4))
    assert any("graph" in r.lower() for r in decision.refusals), (
        f"use_graphs=True on a platform without a GraphRunner must be refused with a reason "
        f"mentioning graphs; refusals: {decision.refusals}")


def test_config_refuses_unknown_kv_cache_dtype_with_reason(backplane_platform):
    _, decision = _decide(backplane_platform, kv_cache_dtype="no_such_kv_dtype")
    if any("kv_cache_dtype" in r for r in decision.refusals):
        return
    # Not refused by the policy: backend selection must then refuse it, with a reason.
    spec = AttentionSpec(4, 2, 32, backplane_platform.runtime.default_dtype(), 16,
                         kv_cache_dtype="no_such_kv_dtype")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        backplane_platform.select_attention_backend(spec)


def test_config_forced_unknown_backend_is_refused_with_choices(backplane_platform):
    spec = AttentionSpec(4, 2, 32, torch.float32, 16)
    with pytest.raises(ValueError) as info:
        backplane_platform.select_attention_backend(spec, forced="no_such_backend")
    text = str(info.value)
    assert "no_such_backend" in text
    for backend in backplane_platform.all_attention_backends():
        assert backend.name in text, f"refusal should list available backend {backend.name!r}"


def test_config_unservable_spec_lists_every_backend_reason(backplane_platform):
    spec = AttentionSpec(4, 2, 32, torch.int32, 16)
    with pytest.raises(ValueError) as info:
        backplane_platform.select_attention_backend(spec)
    text = str(info.value)
    for backend in backplane_platform.all_attention_backends():
        assert backend.name in text
    assert "dtype" in text
