"""cpu_paged with an fp8 KV cache: the bytes it stores and the attention it computes.

The write path must store exactly the SDK's `quantize_kv_fp8` (round to nearest
even, saturate, subnormals); attention must match a float64 reference over the
dequantized cache at the compute dtype's tolerance, for the geometries the
models use (head sizes 64 and 128, GQA groups, block sizes 16 and 32; with
bf16 queries on a CPU with AVX512-BF16 the kernel widens the bytes to bf16 in
the pair layout, elsewhere to float).
"""

from __future__ import annotations

import pytest
import torch

from backplane.platforms.cpu import native
from backplane.platforms.cpu.paged_attention import (
    _CACHE_KINDS,
    CpuPagedAttentionBackend,
    _kernel,
    _kernel_for,
)
from backplane.plugins_sdk import AttentionSpec, CommonAttentionMetadata
from backplane.plugins_sdk.attention import (
    FP8_KV_CACHE_DTYPES,
    kv_cache_torch_dtype,
    quantize_kv_fp8,
)
from backplane.plugins_sdk.testing.paged import PagedAttentionHarness, tolerance

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def _cache_bytes(cache: torch.Tensor, which: int, heads: int, head: int, block: int,
                 pair_layout: bool):
    """[slots, heads, head] bytes of the head-major cache in the kernel's block layout:
    keys [head][block] and values [block][head], or with pair_layout keys
    [head/2][block][2] and values [block/2][head][2]."""
    raw = cache[which].view(torch.uint8)
    blocks = raw.shape[1]
    if which == 0 and pair_layout:
        raw = raw.reshape(heads, blocks, head // 2, block, 2).permute(1, 3, 0, 2, 4)
    elif which == 0:
        raw = raw.reshape(heads, blocks, head, block).permute(1, 3, 0, 2)
    elif pair_layout:
        raw = raw.reshape(heads, blocks, block // 2, head, 2).permute(1, 2, 4, 0, 3)
    else:
        raw = raw.reshape(heads, blocks, block, head).permute(1, 2, 0, 3)
    return raw.reshape(blocks * block, heads, head)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_stores_the_sdk_quantizer_bytes(kv_cache_dtype, dtype):
    heads, head, block, blocks = 2, 32, 16, 5
    spec = AttentionSpec(4, heads, head, dtype, block, kv_cache_dtype=kv_cache_dtype)
    fp8 = FP8_KV_CACHE_DTYPES[kv_cache_dtype]
    backend = CpuPagedAttentionBackend(spec)
    cache = CpuPagedAttentionBackend.allocate_kv_cache(
        CpuPagedAttentionBackend.kv_cache_shape(blocks, block, heads, head), fp8,
        torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    n = 70
    # Magnitudes 2^-24 .. 2^24 after scaling: zero, subnormals, normals, saturation.
    x = torch.randn(n, heads, head, generator=gen) * torch.logspace(-24, 24, n, base=2)[:, None,
                                                                                         None]
    x[0, 0, :5] = torch.tensor([0.0, 448.0, -464.0, 57344.0, -1e30])
    key, value = x.to(dtype), (x * 0.3).to(dtype)
    scales = torch.tensor([0.37, 1.9])
    slots = torch.randperm(blocks * block, generator=gen)[:n]
    qsl = torch.tensor([0, n], dtype=torch.int32)
    seq = torch.tensor([n], dtype=torch.int32)
    common = CommonAttentionMetadata(1, n, n, n, qsl, seq, torch.zeros(1, 5, dtype=torch.int32),
                                     slots, qsl, seq)
    query = torch.randn(n, 4, head, generator=gen).to(dtype)
    backend.forward(query, key, value, cache, backend.build_metadata(common), 0.1,
                    kv_scales=scales)
    pair_layout = bool(_kernel_for(spec).pair_layout())
    for which, src in ((0, key), (1, value)):
        got = _cache_bytes(cache, which, heads, head, block, pair_layout)[slots]
        want = quantize_kv_fp8(src, float(scales[which]), fp8).view(torch.uint8)
        assert torch.equal(got, want), f"{(got != want).sum().item()} bytes differ"


GEOMETRIES = [
    # (num_heads, num_kv_heads, head_size, block_size)
    (4, 2, 64, 16),
    (14, 2, 64, 16),  # qwen2-0.5b: groups of 7
    (8, 8, 128, 32),
    (4, 1, 128, 16),
]


class _PortableLoop(CpuPagedAttentionBackend):
    """cpu_paged built with the plain C loop even where the CPU has the AVX2 one."""

    def __init__(self, spec):
        super().__init__(spec)
        self._lib = _kernel(spec.dtype, spec.head_size, spec.block_size,
                            spec.num_heads // spec.num_kv_heads,
                            _CACHE_KINDS[kv_cache_torch_dtype(spec.kv_cache_dtype, spec.dtype)],
                            None, True)


@pytest.mark.parametrize("loop", ["default", "portable"])
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_attention_matches_the_dequantized_reference(kv_cache_dtype, dtype, geometry, loop):
    heads, kv_heads, head, block = geometry
    spec = AttentionSpec(heads, kv_heads, head, dtype, block, kv_cache_dtype=kv_cache_dtype)
    requests = ((40, 1), (0, 23), (17, 6), (3, 1))
    backend = CpuPagedAttentionBackend if loop == "default" else _PortableLoop
    harness = PagedAttentionHarness(backend, spec, torch.device("cpu"),
                                    [c + q + 1 for c, q in requests], seed=7)
    tol = tolerance(dtype)
    for query_lens in ({i: c for i, (c, _) in enumerate(requests) if c},
                       {i: q for i, (_, q) in enumerate(requests)},
                       {i: 1 for i in range(len(requests))}):
        result = harness.step(query_lens)
        err = (result.output - result.expected).abs().max().item()
        assert torch.allclose(result.output, result.expected, **tol), err


def test_fp8_forward_needs_the_scales():
    spec = AttentionSpec(4, 2, 32, torch.float32, 16, kv_cache_dtype="fp8")
    backend = CpuPagedAttentionBackend(spec)
    qsl, seq = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    common = CommonAttentionMetadata(1, 1, 1, 1, qsl, seq, torch.zeros(1, 1, dtype=torch.int32),
                                     torch.tensor([0]), qsl, seq)
    cache = torch.zeros(2, 2, 2, 16, 32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs kv_scales"):
        backend.forward(torch.zeros(1, 4, 32), torch.zeros(1, 2, 32), torch.zeros(1, 2, 32),
                        cache, backend.build_metadata(common), 1.0)
    with pytest.raises(ValueError, match="float8_e4m3fn KV cache"):
        backend.forward(torch.zeros(1, 4, 32), torch.zeros(1, 2, 32), torch.zeros(1, 2, 32),
                        cache.float(), backend.build_metadata(common), 1.0,
                        kv_scales=torch.ones(2))


class _IgnoresScales(CpuPagedAttentionBackend):
    """A planted bug: quantizes and attends with scale 1.0 whatever it is given."""

    name = "ignores_scales"

    def forward(self, *args, kv_scales=None):
        return super().forward(*args, kv_scales=torch.ones(2))


class _Truncates(CpuPagedAttentionBackend):
    """A planted bug: writes K/V rounded toward zero instead of to nearest even."""

    name = "truncates"

    def forward(self, query, key, value, *args, kv_scales=None):
        scales = kv_scales.tolist()
        fp8 = torch.float8_e4m3fn

        def truncated(x, scale):
            """x whose x / scale is the fp8 value toward zero (the next lower code)."""
            y = (x.float() / scale).clamp(-448, 448)
            codes = y.to(fp8).view(torch.uint8).to(torch.int16)
            too_big = y.to(fp8).float().abs() > y.abs()
            lower = torch.where(too_big & (codes & 0x7F > 0), codes - 1, codes)
            return (lower.to(torch.uint8).view(fp8).float() * scale).to(x.dtype)

        return super().forward(query, truncated(key, scales[0]), truncated(value, scales[1]),
                               *args, kv_scales=kv_scales)


@pytest.mark.parametrize("bug", [_IgnoresScales, _Truncates], ids=lambda b: b.name)
def test_the_kit_catches_a_wrong_fp8_backend(bug):
    from backplane.plugins_sdk.testing.suite import conformance_attention as kit

    case = next(c for c in kit.CASES if c.id == "mixed")
    with pytest.raises(AssertionError, match="max abs error"):
        kit._run_case(bug, case, torch.float32, torch.device("cpu"), "fp8_e4m3")
