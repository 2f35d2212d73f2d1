"""The Triton backend's fp8 KV cache under the Triton interpreter (see test_triton_fp8_kv.py).

Run in a subprocess because TRITON_INTERPRET must be set before triton decorates
the kernels. Checks, per fp8 format: the write kernel stores exactly the SDK's
``quantize_kv_fp8`` bytes (saturation and subnormals included), and attention
over the fp8 cache matches the conformance kit's float64 reference over the
dequantized K/V (the kit's own cases and tolerance). Prints ``{case_id: "ok" |
error text}`` as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

FORMATS = ("fp8_e4m3", "fp8_e5m2")
# float16 too; bfloat16 stays for the GPU run (the interpreter's tl.dot lacks it).
DTYPES = (torch.float32, torch.float16)
ATTENTION_CASES = ("prefill_with_prefix", "decode", "mixed_mqa", "gqa_4to1_decode",
                   "sliding_window_8", "multi_query_decode")


def case_ids() -> list[str]:
    ids = [f"write-{fmt}-{str(dt).removeprefix('torch.')}" for fmt in FORMATS for dt in DTYPES]
    ids += [f"attention-{case}-{fmt}-{str(dt).removeprefix('torch.')}"
            for fmt in FORMATS for dt in DTYPES for case in ATTENTION_CASES]
    return ids + [f"scales-read-at-each-call-{fmt}" for fmt in FORMATS]


def _check_write(fmt: str, dtype: torch.dtype) -> None:
    from backplane.platforms.cuda import triton_kernels
    from backplane.plugins_sdk.attention import FP8_KV_CACHE_DTYPES, quantize_kv_fp8

    fp8 = FP8_KV_CACHE_DTYPES[fmt]
    gen = torch.Generator().manual_seed(0)
    n, heads, head = 40, 2, 16
    # Magnitudes from 2^-20 to 2^20 (x/scale) cover zero, subnormals, normals and saturation.
    x = torch.randn(n, heads, head, generator=gen) * torch.logspace(-20, 20, n, base=2)[:, None, None]
    x[0, 0, :6] = torch.tensor([0.0, -0.0, 448.0, -464.0, 57344.0, 1e9])
    key, value = x.to(dtype), (x * 0.75).to(dtype)
    scales = torch.tensor([0.5, 3.0])
    cache = torch.zeros(2, 4, 16, heads, head, dtype=fp8)
    slots = torch.randperm(64, generator=gen)[:n].to(torch.int64)
    slots[3] = -1  # padding: never written
    triton_kernels.write_kv_cache(key, value, cache[0], cache[1], slots, kv_scales=scales)
    for which, src in ((0, key), (1, value)):
        got = cache[which].view(-1, heads, head).view(torch.uint8)
        want = quantize_kv_fp8(src, float(scales[which]), fp8).view(torch.uint8)
        real = slots >= 0
        diff = (got[slots[real]] != want[real]).sum().item()
        assert diff == 0, f"{'kv'[which]}: {diff} bytes differ from quantize_kv_fp8"
        written = torch.zeros(64, dtype=torch.bool)
        written[slots[real]] = True
        assert not got[~written].any(), "slots outside slot_mapping (or slot -1) were written"


def _check_attention(case_id: str, fmt: str, dtype: torch.dtype) -> None:
    from backplane.platforms.cuda.triton_attention import TritonPagedAttentionBackend
    from backplane.plugins_sdk.testing.suite import conformance_attention as kit

    case = next(c for c in kit.CASES if c.id == case_id)
    kit._run_case(TritonPagedAttentionBackend, case, dtype, torch.device("cpu"), fmt)


def _check_scales_read_at_each_call(fmt: str) -> None:
    """Scales updated in place take effect at the next launch (what a recorded graph
    relies on): doubling v_scale doubles the output; doubling k_scale changes it."""
    from backplane.platforms.cuda import triton_kernels
    from backplane.plugins_sdk.attention import FP8_KV_CACHE_DTYPES

    gen = torch.Generator().manual_seed(5)
    fp8 = FP8_KV_CACHE_DTYPES[fmt]
    kv_cache = (torch.randn(2, 3, 16, 2, 16, generator=gen)).to(fp8)
    query = torch.randn(2, 4, 16, generator=gen)
    block_table = torch.tensor([[2, 0], [1, 0]], dtype=torch.int32)
    query_start_loc = torch.tensor([0, 1, 2], dtype=torch.int32)
    seq_lens = torch.tensor([13, 16], dtype=torch.int32)
    scales = torch.tensor([1.0, 1.0])

    def run() -> torch.Tensor:
        out = torch.zeros_like(query)
        return triton_kernels.paged_attention(
            query, kv_cache[0], kv_cache[1], out, block_table, query_start_loc, seq_lens,
            num_reqs=2, max_query_len=1, scale=0.25, kv_scales=scales)

    first = run()
    scales[1] = 2.0
    torch.testing.assert_close(run(), 2 * first, rtol=1e-6, atol=1e-6)
    scales[0] = 2.0
    assert not torch.allclose(run(), 2 * first, rtol=1e-3, atol=1e-3), "k_scale not read"


def main() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    results = {}
    for fmt in FORMATS:
        for dt in DTYPES:
            name = str(dt).removeprefix("torch.")
            checks = [(f"write-{fmt}-{name}", _check_write, (fmt, dt))]
            checks += [(f"attention-{case}-{fmt}-{name}", _check_attention, (case, fmt, dt))
                       for case in ATTENTION_CASES]
            for case_id, fn, args in checks:
                try:
                    fn(*args)
                    results[case_id] = "ok"
                except Exception:
                    results[case_id] = traceback.format_exc(limit=4)
        case_id = f"scales-read-at-each-call-{fmt}"
        try:
            _check_scales_read_at_each_call(fmt)
            results[case_id] = "ok"
        except Exception:
            results[case_id] = traceback.format_exc(limit=4)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
