"""--quantization int8 on the cpu platform: W8A16 layers against their dequantized
weights, the engine against bf16, and the refusals."""

from __future__ import annotations

import ctypes
import json
import shutil

import pytest
import torch
from torch import nn

from backplane import LLM, SamplingParams
from backplane.platforms.cpu import linear as cpu_linear
from backplane.platforms.cpu.linear import Int8Linear, bf16_gemm_supported, runnable_gemm_isas
from backplane.platforms.cpu.platform import CpuPlatform

needs_kernel = pytest.mark.skipif(not bf16_gemm_supported(),
                                  reason="neither AVX512-BF16 nor AVX2 (or no C compiler)")
# Every int8 kernel this CPU runs: an AVX512-BF16 CPU checks the AVX2 one as well.
ISAS = runnable_gemm_isas() or [pytest.param(None, marks=pytest.mark.skip(
    reason="neither AVX512-BF16 nor AVX2 on this CPU"))]
PROMPT = "the quick brown fox jumps over the lazy dog and runs into the forest near the river"


def _block_quantized(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x as W8A8 sees it: each row's blocks of 32 rounded to int8 steps of amax / 127."""
    blocks = x.float().reshape(x.shape[0], -1, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # x * (1 / scale), as the kernel rounds it (not x / scale: ties can land apart)
    return (torch.round(blocks * (1 / scale)).clamp(-127, 127) * scale).reshape(x.shape)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rows", "out_features", "in_features"),
                         [(1, 1152, 896), (1, 40, 64), (3, 20, 64), (9, 160, 96), (70, 48, 128),
                          (203, 40, 4864)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activations", ["int8", "bf16"])
def test_int8_layer_matches_its_dequantized_weight(rows, out_features, in_features, bias,
                                                   activations, isa):
    """The kernels compute exactly with the dequantized weight (and, for W8A8, the
    block-quantized activations), up to float32 summation order, on each kernel the
    CPU runs."""
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    layer = Int8Linear(linear.weight, linear.bias, float_output=False, activations=activations,
                       isa=isa)
    weight = layer.dequantized_weight()
    # Symmetric per-row rounding: within half a step of the bf16 weight.
    step = layer.scales[:, None]
    assert ((weight - linear.weight.float()).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    seen = _block_quantized(x) if activations == "int8" else x.float()
    expected = seen @ weight.T + (linear.bias.float() if bias else 0)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected, atol=1e-2, rtol=8e-3)
    logits = Int8Linear(linear.weight, linear.bias, float_output=True,
                        activations=activations, isa=isa)(x)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rows", "in_features", "strided"),
                         [(1, 896, False), (1, 4864, True), (3, 64, True), (70, 1024, False)])
def test_activation_quantization_is_exact_per_block(rows, in_features, strided, isa):
    """W8A8's activation blocks (the vectorised loop): int8 values, scales and offset sums
    exactly as float32 arithmetic gives them, with ties rounded to even and an all-zero
    block (scale 1), in rows of every magnitude."""
    lib = cpu_linear.gemm_kernels(isa)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.quantize_activations.argtypes = [p, i64, i64, i64, p, p, p]
    lib.quantize_activations.restype = None
    torch.manual_seed(in_features)
    full = torch.randn(rows, in_features + 32) * torch.logspace(-3, 3, rows)[:, None]
    full[0, :32] = 0  # an all-zero block
    # max |x| 127: scale 1, so the halves are ties (0.5 -> 0, 1.5 -> 2, -2.5 -> -2)
    full[-1, -32:] = torch.cat([torch.tensor([127.0, -127.0]), torch.arange(-15, 15) + 0.5])
    x = (full[:, 32:] if strided else full[:, :in_features]).bfloat16()
    blocks = in_features // 32
    xq = torch.empty(rows, in_features, dtype=torch.int8)
    scales = torch.empty(rows, blocks)
    sums = torch.empty(rows, blocks, dtype=torch.int32)
    lib.quantize_activations(x.data_ptr(), x.stride(0), rows, in_features, xq.data_ptr(),
                             scales.data_ptr(), sums.data_ptr())
    values = x.float().reshape(rows, blocks, 32)
    amax = values.abs().amax(dim=-1)
    want_scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    want = torch.round(values * (1 / want_scales)[..., None]).clamp(-127, 127)
    assert torch.equal(scales, want_scales)
    assert torch.equal(xq, want.to(torch.int8).reshape(rows, in_features))
    assert torch.equal(sums, 128 * want.sum(dim=-1).to(torch.int32))


def test_w8a8_needs_whole_activation_blocks():
    if not bf16_gemm_supported():
        pytest.skip("no int8 kernel here")
    with pytest.raises(ValueError, match="multiple of 32"):
        Int8Linear(torch.zeros(4, 48, dtype=torch.bfloat16), None, False, activations="int8")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("method", ["int8", "int8_weight_only"])
def test_engine_int8_tracks_bf16(llama_model_dir, method, isa, monkeypatch):
    """Logprob deviation from the bf16 model over a prompt, on each kernel the CPU runs
    (forced: an AVX512-BF16 machine runs the AVX2 kernels too)."""
    monkeypatch.setattr(cpu_linear, "gemm_isa", lambda: isa)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = {}
    for quantization in (None, method):
        llm = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=128, num_kv_blocks=32,
                  quantization=quantization)
        if quantization:
            runner = llm.llm_engine.engine_core.model_runner
            layers = [m for m in runner.model.modules() if isinstance(m, Int8Linear)]
            assert len(layers) == 1 + 4 * 2 and all(m.isa == isa for m in layers)
        outs[quantization] = llm.generate([PROMPT], params, use_tqdm=False)[0]
    bf16, int8 = outs[None], outs[method]
    pairs = list(zip(bf16.prompt_logprobs[1:], int8.prompt_logprobs[1:],
                     bf16.prompt_token_ids[1:], strict=True))
    diffs = [abs(a[t].logprob - b[t].logprob) for a, b, t in pairs]
    assert sum(diffs) / len(diffs) < 0.05 and max(diffs) < 0.2, diffs


def test_kernels_a_cpu_lacks_are_refused_naming_the_instruction_set(llama_model_dir,
                                                                    monkeypatch):
    """An AVX2-only CPU runs every method (int8, fp8, GPTQ / AWQ int4); a CPU with
    neither AVX2 nor AVX512-BF16 runs none, and the refusal says what is missing."""
    monkeypatch.setattr(cpu_linear, "gemm_isa", lambda: "avx2")
    assert {"int8", "int8_weight_only", "fp8", "compressed-tensors", "gptq", "awq"} <= set(
        CpuPlatform().supported_quantization)
    monkeypatch.setattr(cpu_linear, "gemm_isa", lambda: None)
    for method in ("int8", "fp8"):
        with pytest.raises(ValueError, match=rf"quantization \('{method}'\) has no kernel on "
                                             r"platform 'cpu'.*AVX512-BF16 or AVX2 \+ FMA \+ "
                                             r"F16C, which this CPU lacks"):
            LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=16, quantization=method)
    assert CpuPlatform().quantization_unsupported_reason("gptq") == (
        "its cpu kernels need AVX512-BF16 or AVX2 + FMA + F16C, which this CPU lacks")


def test_other_methods_platforms_and_quantized_checkpoints_are_refused(
        llama_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"quantization \('bitsandbytes'\) is not supported"):
        LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=16,
            quantization="bitsandbytes")
    with pytest.raises(ValueError, match="torch.compile"):
        if not bf16_gemm_supported():
            pytest.skip("no int8 kernel here")
        LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=16, quantization="int8",
            optimization_level=1)
    quantized = tmp_path / "gptq"
    shutil.copytree(llama_model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 8}  # only 4-bit loads
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized checkpoint.*'gptq'"):
        LLM(model=str(quantized), max_model_len=64, num_kv_blocks=16)
    monkeypatch.setattr(CpuPlatform, "supported_quantization", property(lambda self: ()))
    with pytest.raises(ValueError, match="has no kernel on platform 'cpu'"):
        LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=16, quantization="int8")
