"""Run the Triton int4 matmul on small cases under the Triton interpreter.

Executed in a subprocess by ``test_triton_int4.py`` (TRITON_INTERPRET must be set
before triton decorates the kernels). Compares each case with ``x @ W.T + bias``
for the dequantized float32 weight and prints ``{case_id: "ok" | error}`` as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

# (case id, rows, out, in, group, symmetric, act-order, bias, dtype)
CASES = [
    ("gptq-sym-f32", 1, 40, 64, 32, True, False, False, torch.float32),
    ("gptq-asym-act-order-f32", 5, 24, 128, 64, False, True, True, torch.float32),
    ("awq-f32", 20, 72, 64, 16, False, False, True, torch.float32),
    ("per-channel-f32", 3, 16, 48, 48, True, False, False, torch.float32),
    ("gptq-f16", 7, 64, 64, 32, True, True, True, torch.float16),
]


def case_ids() -> list[str]:
    return [c[0] for c in CASES] + ["gptq-packing"]


def main() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    from backplane.core.quantization.packing import pack_int32_nibbles, quantize_rtn
    from backplane.platforms.cuda.triton_int4 import TritonInt4Linear, pack_gptq_columns
    from backplane.plugins_sdk.quantization import Int4Weights

    results = {}
    for case_id, rows, n, k, group, sym, act_order, bias, dtype in CASES:
        try:
            gen = torch.Generator().manual_seed(len(case_id))
            w = torch.randn(n, k, generator=gen) * 0.1
            q, zeros, scales = quantize_rtn(w, group, sym=sym)
            weights = Int4Weights(q, scales, zeros, group,
                                  perm=torch.randperm(k, generator=gen) if act_order else None,
                                  bias=torch.randn(n, generator=gen) if bias else None)
            layer = TritonInt4Linear(weights)
            x = torch.randn(rows, k, generator=gen)
            want = x @ weights.dequantize().T
            if bias:
                want = want + weights.bias
            got = layer(x.to(dtype))
            assert got.dtype == dtype, got.dtype
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
            results[case_id] = "ok"
        except Exception:  # noqa: BLE001 - reported per case
            results[case_id] = traceback.format_exc()[-2000:]
    try:
        q = torch.randint(0, 16, (16, 32), dtype=torch.uint8)
        assert torch.equal(pack_gptq_columns(q), pack_int32_nibbles(q.T, 0))
        results["gptq-packing"] = "ok"
    except Exception:  # noqa: BLE001
        results["gptq-packing"] = traceback.format_exc()[-2000:]
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
