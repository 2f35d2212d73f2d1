"""fp8 KV cache of the Triton backend, on the CPU via TRITON_INTERPRET (fp8_interpret_runner.py).

One subprocess runs every check; each is reported as its own test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.platforms.gpu import fp8_interpret_runner

REPO_ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton) - Triton kernels not tested",
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.platforms.gpu.fp8_interpret_runner"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
