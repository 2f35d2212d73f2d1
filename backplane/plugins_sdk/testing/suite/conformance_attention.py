"""Conformance: every attention backend against a float64 reference on paged inputs.

The cases cover prefill, prefill over a cached prefix, decode, multi-query
decode (speculative decoding's k + 1 tokens per request), mixed batches,
MHA/GQA/MQA, block sizes 1 to 32, a softmax scale other than 1/sqrt(head_size)
(``scale_0_3``), a sliding window (``sliding_window_8``) and attention logit
soft-capping (``soft_cap_*``, skipped for a backend that declares it does not
support it). Each case runs up
to three steps through `PagedAttentionHarness`: a prefill that writes the
cached prefixes (when the case has any), the case's own step (optionally
followed by padding tokens with slot -1), then one decode step for every
request, which reads back everything written before, so a backend that writes
padding or misplaces keys fails there even if the step itself looked right.

fp8 KV cache (``test_attention_fp8_kv_cache_*``): for every backend that lists
``fp8_e4m3`` / ``fp8_e5m2`` in ``supported_kv_cache_dtypes`` (skipped with the
reason for the others), a subset of the cases runs with the harness's K/V
scales; the reference attends over the dequantized fp8 keys and values, so the
tolerance is the compute dtype's. A backend that quantizes differently from
`quantize_kv_fp8` (other rounding, no saturation, a scale ignored) fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from backplane.plugins_sdk.attention import FP8_KV_CACHE_DTYPES, AttentionSpec
from backplane.plugins_sdk.testing.paged import PagedAttentionHarness, tolerance
from backplane.plugins_sdk.testing.plugin import platform_for

pytestmark = pytest.mark.backplane_conformance


@dataclass(frozen=True)
class Case:
    """(cached prefix length, new tokens) per request, plus the head and block layout.

    ``scale`` is the softmax scale passed to ``forward`` (None: 1/sqrt(head_size),
    what the models pass); ``sliding_window`` and ``logits_soft_cap`` go into
    the AttentionSpec.
    """

    id: str
    requests: tuple[tuple[int, int], ...]
    num_heads: int = 4
    num_kv_heads: int = 2
    block_size: int = 16
    num_padding: int = 0
    scale: float | None = None
    sliding_window: int | None = None
    logits_soft_cap: float | None = None


CASES = [
    Case("prefill", ((0, 7), (0, 19), (0, 1))),
    Case("prefill_with_prefix", ((16, 5), (5, 12), (33, 2)), num_padding=3),
    Case("decode", ((9, 1), (30, 1), (1, 1), (16, 1)), num_padding=4),
    Case("mixed", ((12, 1), (0, 9), (20, 6), (3, 1)), num_padding=5),
    Case("mixed_mha", ((12, 1), (0, 9), (20, 6)), num_heads=4, num_kv_heads=4),
    Case("mixed_mqa", ((12, 1), (0, 9), (20, 6)), num_heads=4, num_kv_heads=1, num_padding=2),
    Case("gqa_4to1_decode", ((40, 1), (7, 1)), num_heads=8, num_kv_heads=2),
    Case("block_size_1", ((5, 1), (0, 4), (3, 3)), block_size=1, num_padding=2),
    Case("block_size_8", ((12, 1), (0, 9), (20, 6)), block_size=8, num_padding=1),
    Case("block_size_32", ((40, 1), (0, 33), (31, 3)), block_size=32, num_padding=3),
    # A softmax scale other than 1/sqrt(head_size): a backend must use the one it is given.
    Case("scale_0_3", ((12, 1), (0, 9), (20, 6)), scale=0.3, num_padding=2),
    # Window of 8 keys (p - 7 .. p), crossing block boundaries, with prefixes longer than it.
    Case("sliding_window_8", ((40, 1), (0, 23), (20, 6), (3, 1)), sliding_window=8,
         num_padding=2),
    # Soft-capped scores (Gemma 2): small caps so that tanh changes the result; a large
    # scale drives scores into the saturated part of tanh.
    Case("soft_cap_2", ((12, 1), (0, 9), (20, 6), (3, 1)), logits_soft_cap=2.0, num_padding=2),
    Case("soft_cap_saturated", ((16, 5), (0, 1), (30, 1)), scale=2.0, logits_soft_cap=1.5),
    Case("soft_cap_sliding_window", ((40, 1), (0, 23), (20, 6)), sliding_window=8,
         logits_soft_cap=3.0, num_padding=1),
    # Speculative decoding's verification: k + 1 query tokens per request after a long
    # context (a last known token plus k drafts), uniform and with varying k.
    Case("multi_query_decode", ((37, 4), (16, 4), (5, 4), (63, 4)), num_padding=2),
    Case("multi_query_decode_mixed_k", ((37, 6), (16, 1), (5, 3), (50, 2)), block_size=8),
]


def _backends(config):
    return platform_for(config).all_attention_backends()


def pytest_generate_tests(metafunc):
    if "backend_cls" in metafunc.fixturenames:
        backends = _backends(metafunc.config)
        metafunc.parametrize("backend_cls", backends, ids=[b.name for b in backends])
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[c.id for c in CASES])


def _head_size(backend_cls) -> int:
    sizes = backend_cls.supported_head_sizes
    return 32 if sizes is None or 32 in sizes else min(sizes)


def _spec(backend_cls, case: Case, dtype: torch.dtype,
          kv_cache_dtype: str = "auto") -> AttentionSpec:
    return AttentionSpec(
        num_heads=case.num_heads, num_kv_heads=case.num_kv_heads,
        head_size=_head_size(backend_cls), dtype=dtype, block_size=case.block_size,
        kv_cache_dtype=kv_cache_dtype,
        sliding_window=case.sliding_window, logits_soft_cap=case.logits_soft_cap,
    )


def _run_case(backend_cls, case: Case, dtype: torch.dtype, device,
              kv_cache_dtype: str = "auto") -> None:
    spec = _spec(backend_cls, case, dtype, kv_cache_dtype)
    reasons = backend_cls.unsupported_reasons(spec)
    if reasons:
        pytest.skip(f"{backend_cls.name} declares it cannot serve this case: {'; '.join(reasons)}")
    # +1: the final decode step appends one token to every request.
    harness = PagedAttentionHarness(
        backend_cls, spec, device, [ctx + q + 1 for ctx, q in case.requests], seed=len(case.id),
        scale=case.scale)
    tol = tolerance(dtype)
    steps = []
    prefixes = {i: ctx for i, (ctx, _) in enumerate(case.requests) if ctx}
    if prefixes:
        steps.append(("prefix prefill", prefixes, 0))
    steps.append((case.id, {i: q for i, (_, q) in enumerate(case.requests)}, case.num_padding))
    steps.append(("decode after", {i: 1 for i in range(len(case.requests))}, 0))
    for name, query_lens, padding in steps:
        result = harness.step(query_lens, num_padding=padding)
        assert torch.isfinite(result.output).all(), f"step {name!r}: non-finite output"
        err = (result.output - result.expected).abs().max().item()
        assert torch.allclose(result.output, result.expected, **tol), (
            f"{backend_cls.name}, case {case.id}, step {name!r}: max abs error {err:.3g} "
            f"exceeds atol={tol['atol']} rtol={tol['rtol']} ({str(dtype)}, kv_cache_dtype "
            f"{kv_cache_dtype})")


def test_attention_matches_reference_float32(backplane_device, backend_cls, case):
    if torch.float32 not in backend_cls.supported_dtypes:
        pytest.skip(f"{backend_cls.name} does not support float32")
    _run_case(backend_cls, case, torch.float32, backplane_device)


@pytest.mark.parametrize("case_id", ["mixed", "prefill_with_prefix"])
def test_attention_matches_reference_default_dtype(backplane_platform, backplane_device,
                                                   backend_cls, case_id):
    dtype = backplane_platform.runtime.default_dtype()
    if dtype not in backend_cls.supported_dtypes:
        pytest.skip(f"{backend_cls.name} does not support the platform default dtype {dtype}")
    case = next(c for c in CASES if c.id == case_id)
    _run_case(backend_cls, case, dtype, backplane_device)


# The fp8 cases: prefill over a cached prefix, decode, mixed, GQA/MQA, small and
# large blocks, a sliding window and speculative multi-query decode.
FP8_CASE_IDS = ("prefill_with_prefix", "decode", "mixed", "mixed_mqa", "gqa_4to1_decode",
                "block_size_8", "block_size_32", "sliding_window_8", "multi_query_decode")
FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")


def _skip_unless_fp8(backend_cls, kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in backend_cls.supported_kv_cache_dtypes:
        pytest.skip(f"{backend_cls.name} does not declare kv_cache_dtype {kv_cache_dtype!r} "
                    f"(supported_kv_cache_dtypes: {backend_cls.supported_kv_cache_dtypes})")


@pytest.mark.parametrize("kv_cache_dtype", FP8_FORMATS)
@pytest.mark.parametrize("case_id", FP8_CASE_IDS)
def test_attention_fp8_kv_cache_matches_dequantized_reference(
        backplane_device, backend_cls, case_id, kv_cache_dtype):
    _skip_unless_fp8(backend_cls, kv_cache_dtype)
    dtype = torch.float32 if torch.float32 in backend_cls.supported_dtypes else None
    if dtype is None:
        pytest.skip(f"{backend_cls.name} does not support float32")
    case = next(c for c in CASES if c.id == case_id)
    _run_case(backend_cls, case, dtype, backplane_device, kv_cache_dtype)


@pytest.mark.parametrize("kv_cache_dtype", FP8_FORMATS)
def test_attention_fp8_kv_cache_default_dtype(backplane_platform, backplane_device,
                                              backend_cls, kv_cache_dtype):
    _skip_unless_fp8(backend_cls, kv_cache_dtype)
    dtype = backplane_platform.runtime.default_dtype()
    if dtype not in backend_cls.supported_dtypes:
        pytest.skip(f"{backend_cls.name} does not support the platform default dtype {dtype}")
    case = next(c for c in CASES if c.id == "mixed")
    _run_case(backend_cls, case, dtype, backplane_device, kv_cache_dtype)


def test_attention_fp8_declared_consistently(backend_cls):
    """``fp8`` is ``fp8_e4m3``: a backend declares both or neither; one that declares
    no fp8 format refuses an fp8 spec with a kv_cache_dtype reason."""
    declared = set(backend_cls.supported_kv_cache_dtypes) & set(FP8_KV_CACHE_DTYPES)
    assert ("fp8" in declared) == ("fp8_e4m3" in declared), (
        f"{backend_cls.name} declares {sorted(declared)}: 'fp8' means 'fp8_e4m3', so "
        "declare both or neither")
    for name in set(FP8_KV_CACHE_DTYPES) - declared:
        spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=_head_size(backend_cls),
                             dtype=torch.float32, block_size=16, kv_cache_dtype=name)
        reasons = backend_cls.unsupported_reasons(spec)
        assert any("kv_cache_dtype" in r for r in reasons), (
            f"{backend_cls.name} does not declare {name!r} but accepts it (reasons: {reasons})")


def test_attention_kv_cache_shape_holds_every_slot(backend_cls):
    shape = backend_cls.kv_cache_shape(7, 16, 2, 32)
    numel = 1
    for dim in shape:
        numel *= dim
    assert numel >= 2 * 7 * 16 * 2 * 32, f"kv_cache_shape {shape} is too small for K and V"


def test_attention_declares_unsupported_configs_with_reasons(backend_cls):
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=_head_size(backend_cls),
                         dtype=torch.int32, block_size=16, kv_cache_dtype="no_such_dtype")
    reasons = backend_cls.unsupported_reasons(spec)
    assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons)
    text = " ".join(reasons)
    assert "dtype" in text, f"int32 compute should be refused with a reason, got {reasons}"
    assert "kv_cache_dtype" in text, f"unknown kv_cache_dtype should be refused, got {reasons}"


def test_attention_refuses_soft_cap_unless_declared(backend_cls):
    """A backend that does not declare ``supports_logits_soft_cap`` must say so, not
    silently attend without the cap."""
    if getattr(backend_cls, "supports_logits_soft_cap", False):
        pytest.skip(f"{backend_cls.name} implements logits_soft_cap (checked by soft_cap_* cases)")
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=_head_size(backend_cls),
                         dtype=torch.float32, block_size=16, logits_soft_cap=30.0)
    reasons = backend_cls.unsupported_reasons(spec)
    assert any("soft" in r for r in reasons), (
        f"{backend_cls.name} does not declare supports_logits_soft_cap but accepts a "
        f"soft-capped spec (reasons: {reasons})")
