"""Triton multi-LoRA shrink/expand kernels against the SDK's torch default, via TRITON_INTERPRET.

The kernels run in one subprocess (see lora_interpret_runner.py); each case is
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

from tests.platforms.gpu import lora_interpret_runner

REPO_ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton) - Triton LoRA kernels not tested",
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.platforms.gpu.lora_interpret_runner"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case_id", lora_interpret_runner.case_ids())
def test_triton_lora_matches_torch_default(interpreted_results, case_id):
    assert case_id in interpreted_results, f"runner did not report {case_id}"
    assert interpreted_results[case_id] == "ok", interpreted_results[case_id]


def test_cuda_platform_falls_back_to_torch_off_gpu():
    import torch

    from backplane.platforms.cuda.platform import CudaPlatform
    from backplane.plugins_sdk import LoRAMapping, add_lora_torch
    from tests.plugins.test_lora_op import make_lora_inputs

    platform = CudaPlatform.__new__(CudaPlatform)  # the method needs no platform state
    out, x, a, b = make_lora_inputs(4, 16, 12, 2, 4)
    mapping = LoRAMapping.build([1, -1, 0, 1])
    want = add_lora_torch(out.clone(), x, a, b, mapping)
    torch.testing.assert_close(platform.add_lora(out, x, a, b, mapping), want)
