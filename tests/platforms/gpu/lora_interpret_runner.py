"""Run the Triton multi-LoRA kernels on small cases under the Triton interpreter.

Executed in a subprocess by ``test_lora_kernels.py`` (TRITON_INTERPRET must be
set before triton decorates the kernels). Compares each case with the SDK's
torch default and prints ``{case_id: "ok" | error}`` as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

# (case id, token slots, in, out, slots, rank, output slices, dtype, tile sizes)
CASES = [
    ("mixed-f32", [2, -1, 0, 2, 3, -1, 0, 0, 2], 32, 24, 4, 8, None, torch.float32, {}),
    ("all-base-f32", [-1] * 5, 16, 16, 2, 8, None, torch.float32, {}),
    ("one-slot-f32", [1] * 20, 48, 40, 3, 16, None, torch.float32,
     dict(block_n=16, block_k=16)),
    ("gate-up-f32", [0, 1, -1, 1, 0, 1], 32, 40, 2, 16, (24, 16), torch.float32, {}),
    ("qkv-f32", [2, 0, -1, 2, 2, 1, 0], 32, 48, 3, 12, (32, 8, 8), torch.float32, {}),
    ("mixed-f16", [1, 0, -1, 1, 1, 0, 3], 32, 32, 4, 8, None, torch.float16, {}),
]


def case_ids() -> list[str]:
    return [c[0] for c in CASES] + ["align_by_slot"]


def main() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    from backplane.platforms.cuda import lora_kernels
    from backplane.plugins_sdk import LoRAMapping, add_lora_torch
    from tests.plugins.test_lora_op import block_diagonal, make_lora_inputs

    results = {}
    for case_id, slots, i, o, num_slots, rank, slices, dtype, tiles in CASES:
        try:
            out, x, a, b = make_lora_inputs(len(slots), i, o, num_slots, rank, dtype,
                                            seed=len(results))
            b = block_diagonal(b, slices)  # the contract: zero outside each part's block
            token_slots = torch.tensor(slots, dtype=torch.int32)
            want = add_lora_torch(out.clone(), x, a, b, LoRAMapping.build(token_slots), slices)
            got = lora_kernels.add_lora(out, x, a, b, token_slots, slices, **tiles)
            assert got is out and got.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
            results[case_id] = "ok"
        except Exception:
            results[case_id] = traceback.format_exc(limit=4)
    try:
        rows, tile_slots = lora_kernels.align_by_slot(
            torch.tensor([3, -1, 0, 3, 3, 0], dtype=torch.int32), 4, 16)
        assert rows.numel() == tile_slots.numel() * 16
        groups = {}
        for j, slot in enumerate(tile_slots.tolist()):
            real = [r for r in rows[j * 16:(j + 1) * 16].tolist() if r < 6]
            if real:
                groups[slot] = sorted(real)
        assert groups == {0: [2, 5], 3: [0, 3, 4], 4: [1]}, groups
        results["align_by_slot"] = "ok"
    except Exception:
        results["align_by_slot"] = traceback.format_exc(limit=4)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
