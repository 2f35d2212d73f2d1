"""The in-tree cpu platform passes the plugin conformance kit (run as plugin authors run it)."""

from __future__ import annotations

from tests.plugins.kit_runner import failures, run_kit


def test_cpu_platform_passes_the_conformance_suite(tmp_path):
    outcomes = run_kit(tmp_path, "cpu")
    assert not failures(outcomes)
    passed = [name for name, o in outcomes.items() if o == "passed"]
    # Every attention case ran on both backends; collectives and config checks ran.
    # Both implement logits_soft_cap, so the soft_cap_* cases run on both too.
    for backend in ("cpu_paged", "cpu_sdpa"):
        assert sum(n.startswith(f"test_attention_matches_reference_float32[{backend}-")
                   for n in passed) == 17, backend
        for case in ("scale_0_3", "sliding_window_8", "soft_cap_2", "soft_cap_saturated",
                     "soft_cap_sliding_window", "multi_query_decode",
                     "multi_query_decode_mixed_k"):
            assert f"test_attention_matches_reference_float32[{backend}-{case}]" in passed
    assert "test_communicator_collective[send_recv]" in passed
    assert "test_communicator_collective[isend_recv]" in passed
    assert "test_runtime_descriptor_is_discovered_available_and_compatible" in passed
    assert "test_config_policy_refuses_graphs_without_runner" in passed
    assert "test_config_policy_changes_are_reported" in passed
    # No graph runner on the cpu: skipped with a reason, not failed.
    assert outcomes["test_graph_replay_equals_eager"] == "skipped"
