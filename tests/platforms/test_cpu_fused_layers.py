"""The CPU platform's compiled bf16 RMSNorm, SiLU-and-mul and rotary embedding: same rounding
as the core layers."""

from __future__ import annotations

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.core.layers.activation import SiluAndMul
from backplane.core.layers.norm import RMSNorm
from backplane.core.layers.rotary import ApplyRotary, RotaryEmbedding, apply_rotary
from backplane.platforms.cpu import native
from backplane.platforms.cpu.fused_layers import (
    FusedRMSNorm,
    FusedRotary,
    FusedSiluAndMul,
    fuse_layers,
)
from tests.platforms.prompt_logprobs import prompt_logprob_gaps

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two bf16 tensors in units of the last place."""
    ia, ib = (t.view(torch.int16).to(torch.int32) for t in (a, b))
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("shape", [(1, 896), (64, 896), (5, 3, 64)])
def test_rms_norm_matches_the_core_layer(shape):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=gen) * 2)
    x = (torch.randn(*shape, generator=gen) * 3).to(torch.bfloat16)
    expected, got = norm(x), FusedRMSNorm(norm)(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    # float32 sums in another order may move a value across a rounding boundary
    assert _bf16_ulps(got, expected) <= 1
    assert (got == expected).float().mean() > 0.99


@pytest.mark.parametrize("shape", [(1, 896), (64, 896), (5, 3, 64)])
def test_residual_add_and_norm_match_the_core_layer(shape):
    """(x, residual) -> (norm(x + residual), x + residual): the sum bit for bit (torch's
    bf16 add), the norm as the norm kernel gives it; a row-strided residual is read in
    place and float32 stays on torch."""
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(shape[-1], eps=1e-6, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=gen) * 2)
    fused = FusedRMSNorm(norm)
    assert fused.accepts_residual and norm.accepts_residual
    x = (torch.randn(*shape, generator=gen) * 3).to(torch.bfloat16)
    wide = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 3).to(torch.bfloat16)
    for residual in (wide[..., : shape[-1]].contiguous(), wide[..., shape[-1]:]):
        (want, want_sum), (got, got_sum) = norm(x, residual=residual), fused(x, residual=residual)
        assert torch.equal(want_sum, x + residual) and torch.equal(got_sum, want_sum)
        assert torch.equal(want, norm(x + residual))
        # the fused pass is the norm kernel's own math on the sum, bit for bit; against
        # torch, the float32 sum order may move the normalised value by an ulp, which the
        # scale (up to 2 here) can make two of the output's
        assert torch.equal(got, fused(x + residual))
        assert _bf16_ulps(got, want) <= 2 and (got == want).float().mean() > 0.99
    x32, r32 = torch.randn(4, 64), torch.randn(4, 64)
    norm32 = RMSNorm(64)
    got, got_sum = FusedRMSNorm(norm32)(x32, residual=r32)
    assert torch.equal(got_sum, x32 + r32) and torch.equal(got, norm32(x32 + r32))


def test_rms_norm_on_a_row_strided_view_and_a_fallback_view():
    norm = RMSNorm(64, dtype=torch.bfloat16)
    fused = FusedRMSNorm(norm)
    qkv = torch.randn(7, 3 * 64, dtype=torch.bfloat16)
    rows = qkv[:, 64:128]  # evenly strided rows: the kernel reads them in place
    assert _bf16_ulps(fused(rows), norm(rows)) <= 1
    heads = qkv[:, :128].view(7, 2, 64)  # per-head rows of a wider tensor: torch path
    assert torch.equal(fused(heads), norm(heads))
    x32 = torch.randn(4, 64)
    norm32 = RMSNorm(64)
    assert torch.equal(FusedRMSNorm(norm32)(x32), norm32(x32))  # float32 stays on torch


@pytest.mark.parametrize(("rows", "d"), [(1, 4864), (64, 4864), (3, 100)])
def test_silu_and_mul_matches_the_core_layer(rows, d):
    """16 values at a time (AVX-512: a reciprocal and a corrected quotient instead of
    the division) and the rest one by one (d = 100: 6 x 16 + 4)."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(rows, 2 * d, generator=gen) * 4).to(torch.bfloat16)
    # exp clamping at both ends, signed zeros, the edge of torch's overflow to -0
    x[0, :8] = torch.tensor([-100.0, 100.0, 0.0, -0.0, -88.0, -87.5, 88.5, -88.69])
    x[-1, d - 4:d] = torch.tensor([-100.0, 0.0, -0.0, 3.0])  # in the one-by-one tail
    # exp(88.5) is finite though 2^128 is not (the scalar exp once returned inf there)
    x[0, d - 4:d] = torch.tensor([-88.69, 88.5, -87.5, -88.0])
    expected, got = SiluAndMul()(x), FusedSiluAndMul(SiluAndMul())(x)
    assert got.shape == expected.shape == (rows, d)
    assert _bf16_ulps(got, expected) <= 1
    assert (got == expected).float().mean() > 0.99


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_rotary_matches_the_core_layer_bit_for_bit(tokens):
    """On a view of the fused q/k/v rows (the decoder's case) and on a contiguous tensor,
    with the cos / sin the model's rotary table gives."""
    gen = torch.Generator().manual_seed(2)
    rope = RotaryEmbedding(64, 4096, {"rope_type": "default", "rope_theta": 1e6})
    cos, sin = rope.cos_sin(torch.randint(0, 4096, (tokens,), generator=gen), torch.bfloat16)
    qkv = (torch.randn(tokens, 20 * 64, generator=gen) * 4).to(torch.bfloat16)
    fused = FusedRotary(ApplyRotary())
    for x in (qkv[:, : 18 * 64].view(tokens, 18, 64), qkv.view(tokens, 20, 64).contiguous()):
        before = x.clone()
        got = fused(x, cos, sin)
        assert torch.equal(got, apply_rotary(x, cos, sin))
        assert torch.equal(x, before)  # the input is left as it is


def test_rotary_falls_back_where_the_kernel_does_not_apply():
    gen = torch.Generator().manual_seed(3)
    fused = FusedRotary(ApplyRotary())
    x = torch.randn(5, 4, 64, generator=gen).to(torch.bfloat16)
    partial = RotaryEmbedding(64, 128, {"rope_type": "default", "rope_theta": 1e4,
                                        "partial_rotary_factor": 0.5})
    positions = torch.arange(5)
    cos, sin = partial.cos_sin(positions, torch.bfloat16)
    assert cos.shape[-1] == 16
    assert torch.equal(fused(x, cos, sin), apply_rotary(x, cos, sin))  # partial rotary
    full = RotaryEmbedding(64, 128, {"rope_type": "default", "rope_theta": 1e4})
    cos32, sin32 = full.cos_sin(positions, torch.float32)
    assert torch.equal(fused(x.float(), cos32, sin32), apply_rotary(x.float(), cos32, sin32))


def test_fuse_layers_swaps_by_layer_kind():
    model = torch.nn.Sequential(RMSNorm(8, dtype=torch.bfloat16), SiluAndMul(), ApplyRotary(),
                                torch.nn.ReLU())
    assert fuse_layers(model) == 3
    assert isinstance(model[0], FusedRMSNorm) and isinstance(model[1], FusedSiluAndMul)
    assert isinstance(model[2], FusedRotary)
    assert model[0].weight is not None and fuse_layers(model) == 0  # idempotent


def test_engine_in_bf16_fuses_and_agrees_with_torch_layers(llama_model_dir, monkeypatch):
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompt = "the quick brown fox jumps over the lazy dog and runs into the forest"
    fused = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
    modules = list(fused.llm_engine.engine_core.model_runner.model.modules())
    assert any(isinstance(m, FusedRMSNorm) for m in modules)
    assert any(isinstance(m, FusedSiluAndMul) for m in modules)
    assert any(isinstance(m, FusedRotary) for m in modules)
    monkeypatch.setenv("BACKPLANE_CPU_FUSED_LAYERS", "0")
    plain = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
    plain_modules = plain.llm_engine.engine_core.model_runner.model.modules()
    assert not any(isinstance(m, FusedRMSNorm) for m in plain_modules)
    (a,), (b,) = (llm.generate([prompt], params, use_tqdm=False) for llm in (fused, plain))
    diffs = prompt_logprob_gaps(a, b)
    assert max(diffs) < 0.1, diffs
