"""fp8 KV cache of the Triton backend, on the CPU via TRITON_INTERPRET (fp8_interpret_runner.py).

One subprocess runs every check; each is reported as its own test.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.platforms.gpu import fp8_interpret_runner
from tests.platforms.gpu.interpreted import run_interpreted

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton) - Triton kernels not tested",
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return run_interpreted("tests.platforms.gpu.fp8_interpret_runner", timeout=600)


@pytest.mark.parametrize("case_id", fp8_interpret_runner.case_ids())
def test_triton_fp8_kv_cache(interpreted_results, case_id):
    assert case_id in interpreted_results, f"runner did not report {case_id}"
    assert interpreted_results[case_id] == "ok", interpreted_results[case_id]


def test_triton_backend_declares_fp8():
    import torch

    from backplane.platforms.cuda.triton_attention import TritonPagedAttentionBackend
    from backplane.plugins_sdk import AttentionSpec
    from backplane.plugins_sdk.attention import FP8_KV_CACHE_DTYPES

    for name in FP8_KV_CACHE_DTYPES:
        spec = AttentionSpec(4, 2, 64, torch.bfloat16, 16, kv_cache_dtype=name)
        assert TritonPagedAttentionBackend.unsupported_reasons(spec) == []
