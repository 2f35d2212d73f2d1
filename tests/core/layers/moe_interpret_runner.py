"""Run the Triton fused-MoE kernels on small cases under the Triton interpreter.

Executed in a subprocess by ``test_fused_moe.py`` (TRITON_INTERPRET must be
set before triton decorates the kernels). Prints ``{case_id: "ok" | error}`` as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

# (case id, tokens, hidden, intermediate, experts, top_k, dtype, tile sizes)
CASES = [
    ("n7-h32-i48-e4-k2-f32", 7, 32, 48, 4, 2, torch.float32, {}),
    ("n20-h64-i32-e8-k2-f32-small-tiles", 20, 64, 32, 8, 2, torch.float32,
     dict(block_m=16, block_n=16, block_k=16)),
    ("n1-h32-i16-e8-k3-f32", 1, 32, 16, 8, 3, torch.float32, {}),
    ("n9-h48-i24-e4-k1-f16", 9, 48, 24, 4, 1, torch.float16, {}),
]


def case_ids() -> list[str]:
    return [c[0] for c in CASES] + ["align_by_expert"]


def main() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    from backplane.platforms.cuda import triton_moe
    from tests.core.layers.test_fused_moe import make_moe_inputs, naive_fused_moe

    results = {}
    for case_id, n, h, i, e, k, dtype, tiles in CASES:
        try:
            args = make_moe_inputs(n, h, i, e, k, dtype, seed=len(results))
            got = triton_moe.fused_moe(*args, **tiles)
            want = naive_fused_moe(*args)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert got.dtype == dtype and got.shape == (n, h)
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
            results[case_id] = "ok"
        except Exception:
            results[case_id] = traceback.format_exc(limit=4)
    try:
        ids = torch.tensor([[3, 0], [0, 1], [3, 0]])
        rows, tiles = triton_moe.align_by_expert(ids, 4, 16)
        assert rows.numel() == tiles.numel() * 16
        groups = {int(t): sorted(r for r in rows[j * 16:(j + 1) * 16].tolist() if r < 6)
                  for j, t in enumerate(tiles.tolist()) if (rows[j * 16:(j + 1) * 16] < 6).any()}
        assert groups == {0: [1, 2, 5], 1: [3], 3: [0, 4]}, groups
        results["align_by_expert"] = "ok"
    except Exception:
        results["align_by_expert"] = traceback.format_exc(limit=4)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
