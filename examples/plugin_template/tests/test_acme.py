"""Acme's own tests; Backplane's conformance suite runs next to them (see pyproject.toml)."""

from __future__ import annotations

import torch
from backplane.plugins_sdk import AttentionSpec, PlatformConfigView, check_sdk_compatibility

import backplane_acme


def test_descriptor_is_written_for_a_compatible_sdk():
    assert check_sdk_compatibility(backplane_acme.descriptor.sdk_version) is None


def test_probe_needs_a_visible_device(monkeypatch):
    monkeypatch.delenv("ACME_VISIBLE_DEVICES", raising=False)
    result = backplane_acme.descriptor.probe()
    assert not result.available and "ACME_VISIBLE_DEVICES" in result.reason
    monkeypatch.setenv("ACME_VISIBLE_DEVICES", "0,1")
    result = backplane_acme.descriptor.probe()
    assert result.available and "2 Acme device(s)" in result.reason


def test_probe_reports_a_malformed_device_list(monkeypatch):
    monkeypatch.setenv("ACME_VISIBLE_DEVICES", "zero")
    result = backplane_acme.descriptor.probe()
    assert not result.available and "'zero'" in result.reason


def test_backplane_selects_acme_by_name():
    from backplane.platforms import explain_selection

    report = explain_selection("acme")
    assert report.chosen == "acme", report.error
    assert report.plugin("acme").attention_backends == ["acme_paged"]


def test_attention_backend_refuses_unsupported_block_size():
    from backplane_acme.attention import AcmeAttentionBackend

    spec = AttentionSpec(4, 2, 32, torch.float32, block_size=64)
    assert AcmeAttentionBackend.unsupported_reasons(spec) == ["block_size 64 not in (8, 16, 32)"]


def test_policy_refuses_float16():
    from backplane_acme.platform import AcmePlatform

    view = PlatformConfigView.for_testing(dtype=torch.float16)
    decision = AcmePlatform().config_policy.check_and_update(view)
    assert decision.refusals == [
        "dtype float16 is not supported on acme; use dtype='float32' or 'bfloat16'"]


def test_policy_sets_a_fixed_kv_cache_size_unless_one_is_given():
    from backplane_acme.platform import DEFAULT_KV_CACHE_BYTES, AcmePlatform

    policy = AcmePlatform().config_policy
    view = PlatformConfigView.for_testing(dtype=torch.bfloat16)
    decision = policy.check_and_update(view)
    assert not decision.refusals
    assert view.kv_cache_memory_bytes == DEFAULT_KV_CACHE_BYTES
    assert view.updates() == {"kv_cache_memory_bytes": DEFAULT_KV_CACHE_BYTES}
    assert len(decision.changes) == 1 and "512 MiB" in decision.changes[0]
    view = PlatformConfigView.for_testing(num_kv_blocks=64)
    assert not policy.check_and_update(view).changes and view.updates() == {}


def test_policy_refuses_quantized_kv_cache_and_block_size_but_allows_graphs():
    from backplane_acme.platform import AcmePlatform

    view = PlatformConfigView.for_testing(use_graphs=True, kv_cache_dtype="fp8", block_size=64)
    refusals = AcmePlatform().config_policy.check_and_update(view).refusals
    assert [r.split()[0] for r in refusals] == ["kv_cache_dtype", "block_size"]


def test_recorded_decode_step_replays_over_rewritten_buffers():
    import torch

    from backplane_acme.graph import RecordingGraphRunner

    runner = RecordingGraphRunner()
    cache = torch.zeros(8, 2)
    x, slots = torch.zeros(2, 2), torch.tensor([0, 1])

    def step(x, slots):  # writes "KV" by slot and reads the whole cache, like attention
        cache.index_copy_(0, slots, x)
        return cache.sum(0, keepdim=True) + x

    runner.capture_static(step, [x, slots], 2)
    x.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    slots.copy_(torch.tensor([5, 6]))  # new values in place, as the model runner does
    out = runner.replay_static(2)
    assert cache[5].tolist() == [1.0, 2.0] and cache[6].tolist() == [3.0, 4.0]
    assert out.tolist() == [[5.0, 8.0], [7.0, 10.0]]
    assert runner.replay_counts[2] == 1
