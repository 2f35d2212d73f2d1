"""Triton multi-LoRA shrink/expand kernels against the SDK's torch default, via TRITON_INTERPRET.

The kernels run in one subprocess (see lora_interpret_runner.py); each case is
then reported as its own test.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.platforms.gpu import lora_interpret_runner
from tests.platforms.gpu.interpreted import run_interpreted

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton) - Triton LoRA kernels not tested",
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return run_interpreted("tests.platforms.gpu.lora_interpret_runner", timeout=300)


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
