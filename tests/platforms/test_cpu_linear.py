"""The CPU platform's packed linear layers (its own GEMM kernels, AVX512-BF16 and AVX2,
or oneDNN's prepacking): same math, packed once at load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backplane import LLM, SamplingParams
from backplane.platforms.cpu import linear as cpu_linear
from backplane.platforms.cpu.linear import (
    BlockedBf16Linear,
    Int8Linear,
    PackedLinear,
    PackedLogitsProjection,
    bf16_gemm_supported,
    prepack_linear_weights,
    prepacking_supported,
    runnable_gemm_isas,
)
from tests.platforms.prompt_logprobs import prompt_logprob_gaps

PACKED = (PackedLinear, BlockedBf16Linear)
needs_bf16_gemm = pytest.mark.skipif(not bf16_gemm_supported(),
                                     reason="neither AVX512-BF16 nor AVX2 (or no C compiler)")
needs_onednn = pytest.mark.skipif(not prepacking_supported(),
                                  reason="oneDNN bf16 kernels not available on this CPU")
# Every GEMM kernel this CPU runs: an AVX512-BF16 CPU checks the AVX2 one as well.
ISAS = runnable_gemm_isas() or [pytest.param(None, marks=pytest.mark.skip(
    reason="neither AVX512-BF16 nor AVX2 on this CPU"))]


@needs_onednn
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_torch(batch, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(batch, 96, dtype=torch.bfloat16)
    expected = linear(x).float()
    got = PackedLinear(linear)(x).float()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rows", "out_features", "in_features"),
                         [(1, 1152, 896), (1, 24, 6), (3, 20, 6), (8, 33, 64), (9, 160, 96),
                          (20, 40, 64), (70, 48, 128),
                          # AMX: several row blocks of K = 4864 (6 row tiles each), a tail
                          (203, 40, 4864)])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_gemm_kernel_matches_float_reference(rows, out_features, in_features, bias, isa):
    """Every row-tile size (1..8 and more; AMX: a lone partial tile, a full tile paired
    with a partial one, pairs of full tiles), output sizes that are not a multiple of
    the 16-row blocks (nor of 8: the AVX2 kernel's half blocks), bias, and float32
    output (logits), against float32 math, on each kernel the CPU runs."""
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(2, rows, in_features, dtype=torch.bfloat16)
    if rows == 1:
        x = x[:1]  # batch 1: the GEMV tiles
    expected = x.float() @ linear.weight.float().T + (linear.bias.float() if bias else 0)
    layer = BlockedBf16Linear(linear.weight, linear.bias, float_output=False, isa=isa)
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    # bf16 output: within a rounding step of the float32 result
    assert torch.allclose(got.float(), expected, atol=1e-2, rtol=8e-3)
    logits = BlockedBf16Linear(linear.weight, linear.bias, float_output=True, isa=isa)(x)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["bf16", "int8-weights", "int8-weights-and-activations"])
def test_a_rows_result_does_not_depend_on_its_batch(kind, isa):
    """Bitwise batch invariance: a row alone (the GEMV tile), in 2-3 rows (row tiles)
    and among 70 (panels, every tail) gives the same bits, so a greedy request decodes
    the same token whether it runs alone, batched, or verifying speculative drafts."""
    torch.manual_seed(3)
    linear = nn.Linear(128, 200, bias=True, dtype=torch.bfloat16)
    if kind == "bf16":
        layers = [BlockedBf16Linear(linear.weight, linear.bias, float_output=f, isa=isa)
                  for f in (False, True)]
    else:
        acts = "int8" if kind.endswith("activations") else "bf16"
        layers = [Int8Linear(linear.weight, linear.bias, float_output=f, activations=acts,
                             isa=isa) for f in (False, True)]
    x = torch.randn(70, 128, dtype=torch.bfloat16)
    for layer in layers:
        batched = layer(x)
        for rows in (slice(0, 1), slice(5, 6), slice(69, 70), slice(0, 2), slice(7, 10),
                     slice(0, 4), slice(60, 67)):
            assert torch.equal(layer(x[rows]), batched[rows]), (kind, rows)


@pytest.mark.skipif(cpu_linear.gemm_isa() != "avx512_bf16",
                    reason="the streamed logits are the AVX512-BF16 kernel's")
def test_large_float32_outputs_are_streamed_with_the_same_bits():
    """Logits of 8 MiB or more (batch x vocabulary) go straight to memory with
    non-temporal stores: the same bits as the few-row calls that store through the
    caches, a vocabulary that is not a multiple of 16 (a masked last block) and an
    output that is not 64-byte aligned (ordinary stores) included."""
    torch.manual_seed(5)
    linear = nn.Linear(64, 4104, bias=True, dtype=torch.bfloat16)
    layer = BlockedBf16Linear(linear.weight, linear.bias, float_output=True, isa="avx512_bf16")
    x = torch.randn(520, 64, dtype=torch.bfloat16)  # 520 x 4104 x 4 bytes = 8.1 MiB
    streamed = layer(x)
    assert torch.equal(streamed, torch.cat([layer(x[i:i + 8]) for i in range(0, 520, 8)]))
    lib = cpu_linear.gemm_kernels("avx512_bf16")
    shifted = torch.zeros(520 * 4104 + 1)
    assert lib.gemm_bf16(x.data_ptr(), 64, 520, layer.packed_weight.data_ptr(), 4104, 64,
                         layer.bias.data_ptr(), shifted[1:].data_ptr(), 4104, 1) == 0
    assert torch.equal(shifted[1:].view(520, 4104), streamed)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["bf16", "int8-weights", "int8-weights-and-activations"])
def test_strided_and_batched_inputs_give_the_contiguous_result(kind, isa):
    """Rows with a stride wider than the row (a column slice, as q/k/v are of the fused
    projection) go to the kernel in place; 3-D input keeps its leading dims."""
    torch.manual_seed(4)
    linear = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    if kind == "bf16":
        layer = BlockedBf16Linear(linear.weight, linear.bias, float_output=False, isa=isa)
    else:
        acts = "int8" if kind.endswith("activations") else "bf16"
        layer = Int8Linear(linear.weight, linear.bias, float_output=False, activations=acts,
                           isa=isa)
    wide = torch.randn(21, 96, dtype=torch.bfloat16)  # AMX: one full tile read in place
    x = wide[:, 16:80]
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))
    assert torch.equal(layer(x.contiguous().view(3, 7, 64)), layer(x).view(3, 7, 48))


@needs_onednn
def test_only_bf16_layers_are_packed_and_logits_projection_too():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(50, 16, dtype=torch.bfloat16))

        @property
        def logits_weight(self):
            return self.weight

    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.bfloat16), nn.Linear(16, 16), Head())
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(model[0](x), model[2].weight).float()
    assert prepack_linear_weights(model, own_gemm=False) == 2
    assert isinstance(model[0], PackedLinear)
    assert type(model[1]) is nn.Linear  # float32 stays on torch's kernels
    assert isinstance(model[2], PackedLogitsProjection)
    logits = model[2](model[0](x))
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=5e-2, rtol=2e-2)


@needs_bf16_gemm
def test_own_gemm_packing_is_the_default_where_supported(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.bfloat16))
    assert prepack_linear_weights(model) == 1
    assert isinstance(model[0], BlockedBf16Linear)
    monkeypatch.setenv("BACKPLANE_CPU_BF16_GEMM", "0")
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.bfloat16))
    prepack_linear_weights(model)
    # oneDNN's packing where its bf16 kernels run, else torch's linear as it was
    assert isinstance(model[0], PackedLinear if prepacking_supported() else nn.Linear)


def test_amx_is_picked_where_the_cpu_has_it_and_can_be_turned_off(monkeypatch):
    """An AMX CPU runs the tile GEMM by default; BACKPLANE_CPU_AMX=0 keeps the
    AVX512-BF16 one; a CPU without the flags never picks it."""
    flags = cpu_linear.cpu_flags()
    cpu_linear._amx_usable.cache_clear()
    try:
        if {"avx512_bf16", "amx_tile", "amx_bf16"} <= flags and cpu_linear._amx_usable():
            # (a Linux that refuses the tile state leaves _amx_usable False: AVX512 then)
            assert cpu_linear.gemm_isa() == "amx"
            assert runnable_gemm_isas() == ["amx", "avx512_bf16", "avx2"]
        monkeypatch.setenv("BACKPLANE_CPU_AMX", "0")
        cpu_linear._amx_usable.cache_clear()
        assert cpu_linear.gemm_isa() != "amx"
        monkeypatch.setenv("BACKPLANE_CPU_AMX", "1")
        monkeypatch.setattr(cpu_linear, "cpu_flags", lambda: flags - {"amx_bf16"})
        cpu_linear._amx_usable.cache_clear()
        assert cpu_linear.gemm_isa() != "amx"
    finally:
        cpu_linear._amx_usable.cache_clear()


@pytest.mark.skipif(not (bf16_gemm_supported() or prepacking_supported()),
                    reason="no GEMM kernel and no oneDNN bf16 on this CPU")
def test_engine_in_bf16_packs_and_agrees_with_unpacked(llama_model_dir, monkeypatch):
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompt = "the quick brown fox jumps over the lazy dog and runs into the forest"
    packed = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
    runner = packed.llm_engine.engine_core.model_runner
    assert any(isinstance(m, PACKED) for m in runner.model.modules())
    monkeypatch.setenv("BACKPLANE_CPU_PREPACK", "0")
    plain = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
    plain_runner = plain.llm_engine.engine_core.model_runner
    assert not any(isinstance(m, PACKED) for m in plain_runner.model.modules())
    (a,), (b,) = (llm.generate([prompt], params, use_tqdm=False) for llm in (packed, plain))
    diffs = prompt_logprob_gaps(a, b)
    assert max(diffs) < 0.1, diffs


@pytest.mark.parametrize("isa", ISAS)
def test_engine_runs_each_gemm_kernel_and_agrees_with_unpacked(llama_model_dir, monkeypatch,
                                                               isa):
    """The engine packs for the kernel the CPU's instruction set picks (forced here, so
    an AVX512-BF16 machine runs the AVX2 path too) and matches torch's own bf16 linears."""
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=0)
    prompt = "the quick brown fox jumps over the lazy dog and runs into the forest"
    monkeypatch.setattr(cpu_linear, "gemm_isa", lambda: isa)
    packed = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
    layers = [m for m in packed.llm_engine.engine_core.model_runner.model.modules()
              if isinstance(m, BlockedBf16Linear)]
    assert layers and all(layer.isa == isa for layer in layers)
    monkeypatch.setenv("BACKPLANE_CPU_PREPACK", "0")
    plain = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
    (a,), (b,) = (llm.generate([prompt], params, use_tqdm=False) for llm in (packed, plain))
    assert max(prompt_logprob_gaps(a, b)) < 0.1


def test_compiled_level_skips_prepacking_and_runs(llama_model_dir):
    """At O1 torch.compile owns the kernels: weights stay plain, and bf16 generation works."""
    llm = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=64, num_kv_blocks=16,
              optimization_level=1)
    runner = llm.llm_engine.engine_core.model_runner
    assert not any(isinstance(m, PACKED) for m in runner.model.modules())
    (out,) = llm.generate(["the quick brown fox"], SamplingParams(temperature=0.0, max_tokens=2),
                          use_tqdm=False)
    assert len(out.outputs[0].token_ids) >= 1


@pytest.mark.skipif("avx512_bf16" not in runnable_gemm_isas(), reason="no AVX512-BF16 kernel")
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_gate_up_gemm_with_fused_silu_matches_the_two_steps_bit_for_bit(rows, bias):
    """gemm_bf16_silu (the decode layer's gate/up projection, SiLU-and-mul in its store)
    gives the bits of the bf16 GEMM followed by the SiLU-and-mul kernel, for tiles of
    every height; an intermediate size that is not a multiple of 16 is refused (-1) and
    such a layer offers no fused entry point."""
    from backplane.core.layers.activation import SiluAndMul
    from backplane.platforms.cpu.fused_layers import FusedSiluAndMul

    torch.manual_seed(rows)
    d, k = 48, 72  # three gate blocks: one work item per block, an odd count
    layer = BlockedBf16Linear(torch.randn(2 * d, k, dtype=torch.bfloat16) * 0.3,
                              torch.randn(2 * d) if bias else None, float_output=False,
                              isa="avx512_bf16")
    x = torch.randn(rows, k, dtype=torch.bfloat16) * 2
    want = FusedSiluAndMul(SiluAndMul())(layer(x))
    gemm = layer.native_gemm()
    assert gemm.silu_function is not None
    lib = cpu_linear.gemm_kernels("avx512_bf16")
    got = torch.full((rows, d + 5), 7.0, dtype=torch.bfloat16)  # row stride d + 5
    status = lib.gemm_bf16_silu(x.data_ptr(), k, rows, gemm.packed, d, k, gemm.bias,
                                got.data_ptr(), d + 5)
    assert status == 0
    assert torch.equal(got[:, :d].view(torch.int16), want.view(torch.int16))
    assert bool((got[:, d:] == 7.0).all())  # nothing written past each row's d columns
    assert lib.gemm_bf16_silu(x.data_ptr(), k, rows, gemm.packed, d - 8, k, None,
                              got.data_ptr(), d + 5) == -1
    odd = BlockedBf16Linear(torch.randn(2 * 40, k, dtype=torch.bfloat16), None,
                            float_output=False, isa="avx512_bf16")
    assert odd.native_gemm().silu_function is None  # 40 gate rows: not whole blocks
