"""The conformance kit has teeth: it passes a correct platform and fails each planted bug.

Each run is a pytest subprocess (`kit_runner.run_kit`) with the platform given
as ``module:attribute``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.plugins.kit_runner import failures, kit_plugin_args, run_kit


def test_kit_passes_a_correct_platform_including_graphs(tmp_path):
    # Fewer attention cases and no collectives here: the cpu run covers those in full.
    outcomes = run_kit(tmp_path, "tests.plugins.kit_platforms:GoodPlatform",
                       "-k", "(not float32 or mixed or decode) and not communicator")
    assert outcomes, "no test collected"
    assert not failures(outcomes)
    assert outcomes["test_graph_replay_equals_eager"] == "passed"
    assert outcomes["test_graph_captured_sizes"] == "passed"
    assert outcomes["test_attention_matches_reference_float32[reference-mixed]"] == "passed"
    assert outcomes["test_config_policy_accepts_defaults"] == "passed"
    # Given as module:attribute, the entry-point checks are skipped, not failed.
    assert outcomes["test_runtime_descriptor_is_discovered_available_and_compatible"] == "skipped"


def test_kit_catches_planted_bugs(tmp_path):
    outcomes = run_kit(
        tmp_path, "tests.plugins.kit_platforms:BuggyPlatform",
        "-k", "float32 and (mixed or prefill_with_prefix or decode or scale or sliding_window) "
              "or communicator or graph or config_policy")
    expected_failures = [
        "test_attention_matches_reference_float32[writes_padding-mixed]",
        "test_attention_matches_reference_float32[writes_padding-prefill_with_prefix]",
        "test_attention_matches_reference_float32[writes_padding-decode]",
        "test_attention_matches_reference_float32[ignores_prefix-prefill_with_prefix]",
        "test_attention_matches_reference_float32[ignores_prefix-decode]",
        "test_attention_matches_reference_float32[ignores_prefix-mixed]",
        "test_attention_matches_reference_float32[fixed_scale-scale_0_3]",
        "test_attention_matches_reference_float32[ignores_window-sliding_window_8]",
        "test_communicator_collective[reduce_scatter]",
        "test_graph_flag_matches_runner",
        "test_graph_replay_equals_eager",
        "test_config_policy_refuses_graphs_without_runner",
    ]
    assert {name: outcomes.get(name) for name in expected_failures} == {
        name: "failed" for name in expected_failures}
    # The parts that are right still pass: failures point at the bug, not everywhere.
    for name in ("test_communicator_collective[all_reduce]", "test_communicator_collective[broadcast]",
                 "test_communicator_collective[send_recv]", "test_graph_captured_sizes",
                 "test_config_policy_accepts_defaults",
                 "test_attention_matches_reference_float32[fixed_scale-mixed]",
                 "test_attention_matches_reference_float32[ignores_window-mixed]"):
        assert outcomes.get(name) == "passed", (name, outcomes.get(name))
    # A backend that does not declare sliding-window support is skipped there, not failed.
    name = "test_attention_matches_reference_float32[fixed_scale-sliding_window_8]"
    assert outcomes.get(name) == "skipped"


def test_kit_config_checks_use_the_view(tmp_path):
    silent = run_kit(tmp_path, "tests.plugins.kit_platforms:SilentPolicyPlatform",
                     "-k", "config_policy")
    assert silent["test_config_policy_changes_are_reported"] == "failed"
    assert silent["test_config_policy_accepts_defaults"] == "passed"
    # A policy written for SDK 1.0 still loads; the view-based checks are skipped, saying why.
    legacy = run_kit(tmp_path, "tests.plugins.kit_platforms:LegacyPolicyPlatform",
                     "-k", "config_policy", "-rs")
    assert legacy["test_config_policy_accepts_defaults"] == "skipped"
    assert not failures(legacy)


@pytest.mark.parametrize("flag", [[], ["--backplane-platform", ""]])
def test_kit_collects_nothing_unless_asked(tmp_path, flag):
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "BACKPLANE_CONFORMANCE_PLATFORM"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *kit_plugin_args(),
           "--co", *flag]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "1 test collected" in proc.stdout, proc.stdout + proc.stderr
    assert "conformance" not in proc.stdout
