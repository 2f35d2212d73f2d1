"""Run the Triton paged-attention backend on every case under the Triton interpreter.

Executed in a subprocess by ``test_triton_interpreter.py``: TRITON_INTERPRET
must be set before triton decorates the kernels, and setting it in the pytest
process would also turn real GPU launches into interpreted ones. Prints one
JSON object ``{case_id: "ok" | error text}`` on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback

import torch

from tests.platforms.gpu.paged_cases import (
    CASES,
    check_backend_on_case,
    make_case,
    tolerance,
)

# float16 too; bfloat16 is left to the GPU run because the interpreter's
# tl.dot mis-handles bfloat16 operands (numpy has no bfloat16).
INTERPRETED_DTYPES = (torch.float32, torch.float16)


def case_ids() -> list[str]:
    """Every check this runner performs, in order."""
    ids = [f"{spec.name}-{str(dt).removeprefix('torch.')}"
           for dt in INTERPRETED_DTYPES for spec in CASES]
    return ids + [f"{spec.name}-float32-small-tiles" for spec in CASES]


def _check_small_tiles(spec) -> None:
    """The kernel with 2-token/16-key tiles, so every case spans several tiles."""
    from backplane.platforms.cuda import triton_kernels

    case = make_case(spec, seed=1)
    c = case.common
    kv_cache = case.expected_cache.clone()
    out = torch.zeros_like(case.query)
    triton_kernels.paged_attention(
        case.query, kv_cache[0], kv_cache[1], out, c.block_table, c.query_start_loc,
        c.seq_lens, c.num_reqs, c.max_query_len, case.scale, block_q=2, block_n=16,
        sliding_window=spec.sliding_window,
    )
    n = c.num_actual_tokens
    torch.testing.assert_close(
        out[:n].double(), case.expected_out, rtol=0, atol=tolerance(spec.dtype)
    )
    # Rows of padding tokens belong to no request and must stay untouched.
    assert not out[n:].any(), "padding rows were written"


def main() -> int:
    # Before the kernels module is imported: triton.jit reads it at decoration.
    os.environ["TRITON_INTERPRET"] = "1"
    from backplane.platforms.cuda.triton_attention import TritonPagedAttentionBackend

    results = {}
    for dt in INTERPRETED_DTYPES:
        for spec in CASES:
            case_id = f"{spec.name}-{str(dt).removeprefix('torch.')}"
            try:
                check_backend_on_case(
                    TritonPagedAttentionBackend, make_case(dataclasses.replace(spec, dtype=dt))
                )
                results[case_id] = "ok"
            except Exception:
                results[case_id] = traceback.format_exc(limit=3)
    for spec in CASES:
        case_id = f"{spec.name}-float32-small-tiles"
        try:
            _check_small_tiles(spec)
            results[case_id] = "ok"
        except Exception:
            results[case_id] = traceback.format_exc(limit=3)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
