"""Triton int4 (GPTQ / AWQ) matmul against the dequantized weight, via TRITON_INTERPRET.

The kernel runs in one subprocess (see int4_interpret_runner.py); each case is
then reported as its own test.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.platforms.gpu import int4_interpret_runner
from tests.platforms.gpu.interpreted import run_interpreted

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton) - Triton int4 kernel not tested",
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return run_interpreted("tests.platforms.gpu.int4_interpret_runner", timeout=300)


@pytest.mark.parametrize("case_id", int4_interpret_runner.case_ids())
def test_triton_int4_matches_dequantized_weight(interpreted_results, case_id):
    assert case_id in interpreted_results, f"runner did not report {case_id}"
    assert interpreted_results[case_id] == "ok", interpreted_results[case_id]


def test_cuda_platform_declines_cpu_tensors():
    """Off the GPU the cuda platform returns None (the core's reference path)."""
    from backplane.platforms.cuda.platform import CudaPlatform
    from backplane.plugins_sdk.quantization import Int4Weights

    platform = CudaPlatform.__new__(CudaPlatform)  # the method needs no platform state
    weights = Int4Weights(torch.zeros(16, 32, dtype=torch.uint8), torch.ones(16, 1),
                          torch.zeros(16, 1), 32)
    assert platform.make_quantized_linear("gptq", weights) is None
    assert platform.supported_quantization == ("gptq", "awq")
