"""Triton int4 (GPTQ / AWQ) matmul against the dequantized weight, via TRITON_INTERPRET.

The kernel runs in one subprocess (see int4_interpret_runner.py); each case is
then reported as its own test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.platforms.gpu import int4_interpret_runner

REPO_ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton) - Triton int4 kernel not tested",
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.platforms.gpu.int4_interpret_runner"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


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
