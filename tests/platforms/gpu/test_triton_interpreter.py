"""Triton paged-attention kernels against the torch reference, on the CPU via TRITON_INTERPRET.

The kernels run in one subprocess (see interpret_runner.py); each case is then
reported as its own test.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.platforms.gpu import interpret_runner
from tests.platforms.gpu.interpreted import run_interpreted

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton) - Triton kernels not tested",
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return run_interpreted("tests.platforms.gpu.interpret_runner", timeout=600)


@pytest.mark.parametrize("case_id", interpret_runner.case_ids())
def test_triton_backend_matches_reference(interpreted_results, case_id):
    assert case_id in interpreted_results, f"runner did not report {case_id}"
    assert interpreted_results[case_id] == "ok", interpreted_results[case_id]
