"""--quantization fp8 on the cpu platform: e4m3 weights with per-row scales against
their dequantized weight, and the engine against bf16."""

from __future__ import annotations

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.platforms.cpu.fp8 import Fp8Linear, fp8_kernel_supported, quantize_fp8_per_row
from backplane.platforms.cpu.linear import runnable_gemm_isas
from tests.platforms.prompt_logprobs import prompt_logprob_gaps

needs_kernel = pytest.mark.skipif(not fp8_kernel_supported(),
                                  reason="neither AVX512-BF16 nor AVX2 (or no C compiler) here")
# The fp8 kernels this CPU runs (AMX tiles, AVX512-BF16 and AVX2 on an AMX CPU).
FP8_ISAS = runnable_gemm_isas() or [None]
PROMPT = "the quick brown fox jumps over the lazy dog and runs into the forest near the river"


def test_per_row_quantization_is_within_e4m3_precision():
    w = torch.randn(16, 64)
    w8, scales = quantize_fp8_per_row(w)
    assert w8.dtype == torch.float8_e4m3fn
    assert torch.allclose(w8.float().abs().amax(dim=1), torch.full((16,), 448.0))
    err = (w8.float() * scales[:, None] - w).abs()
    assert torch.all(err <= w.abs() * 2 ** -4 + scales[:, None] * 2 ** -9)


@needs_kernel
@pytest.mark.parametrize(("rows", "out_features", "in_features"),
                         [(1, 1152, 896), (3, 20, 64), (9, 160, 96), (70, 48, 128),
                          (203, 40, 4864)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("isa", FP8_ISAS)
def test_fp8_layer_matches_its_dequantized_weight(rows, out_features, in_features, bias, isa):
    """The kernel computes exactly with the dequantized weight (subnormal e4m3 values
    included), up to float32 summation order, on bf16-rounded activations."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    weight[0, :4] = torch.tensor([1e-7, -2e-6, 0.0, 3e-5])  # subnormal after scaling
    b = torch.randn(out_features, generator=gen) if bias else None
    layer = Fp8Linear(weight, b, isa=isa)
    dense = layer.dequantized_weight()
    x = torch.randn(rows, in_features, generator=gen)
    want = x.bfloat16().float() @ dense.T + (b if bias else 0)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= want.abs().max() * 2 ** -8


@needs_kernel
@pytest.mark.parametrize("isa", FP8_ISAS)
def test_a_rows_result_does_not_depend_on_its_batch(isa):
    """Bitwise, as for the bf16 and int8 kernels (test_cpu_linear.py): the scale and
    bias of a one-row tile are applied exactly as in a full tile."""
    torch.manual_seed(5)
    layer = Fp8Linear(torch.randn(200, 128) * 0.05, torch.randn(200), isa=isa)
    x = torch.randn(70, 128, dtype=torch.bfloat16)
    batched = layer(x)
    for rows in (slice(0, 1), slice(69, 70), slice(7, 10), slice(60, 67), slice(0, 33)):
        assert torch.equal(layer(x[rows]), batched[rows]), rows


@needs_kernel
def test_engine_fp8_tracks_bf16(llama_model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = {}
    for quantization in (None, "fp8"):
        llm = LLM(model=llama_model_dir, dtype="bfloat16", max_model_len=128, num_kv_blocks=32,
                  quantization=quantization)
        if quantization:
            runner = llm.llm_engine.engine_core.model_runner
            assert sum(isinstance(m, Fp8Linear) for m in runner.model.modules()) == 4 * 2
        outs[quantization] = llm.generate([PROMPT], params, use_tqdm=False)[0]
        del llm
    bf16, fp8 = outs[None], outs["fp8"]
    diffs = prompt_logprob_gaps(bf16, fp8)
    assert sum(diffs) / len(diffs) < 0.1 and max(diffs) < 0.4, diffs


@pytest.fixture(scope="module")
def fp8_dirs(tiny_model_factory, tmp_path_factory):
    """Tiny float32 Llama -> compressed-tensors fp8 (per channel) and its dequantized twin."""
    from backplane.benchmarks.make_model import quantize_checkpoint

    root = tmp_path_factory.mktemp("fp8ckpt")
    quantized, dense = root / "fp8", root / "fp8-dequantized"
    quantize_checkpoint(tiny_model_factory("llama"), str(quantized), "fp8",
                        dequantized_dir=str(dense))
    return str(quantized), str(dense)


@needs_kernel
def test_compressed_tensors_fp8_checkpoint_matches_dequantized_twin(fp8_dirs):
    quantized, dense = fp8_dirs
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0)
    outs = {}
    for model in (quantized, dense):
        llm = LLM(model=model, max_model_len=128, num_kv_blocks=32)
        if model == quantized:
            assert llm.llm_engine.config.model_config.quantization == "compressed-tensors"
            runner = llm.llm_engine.engine_core.model_runner
            assert sum(isinstance(m, Fp8Linear) for m in runner.model.modules()) == 4 * 2
        outs[model] = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
        del llm
    a, b = outs[quantized], outs[dense]
    assert a.token_ids == b.token_ids
    # float32 activations are rounded to bf16 by the fp8 kernel: close, not exact
    for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids, strict=True):
        assert abs(la[t].logprob - lb[t].logprob) < 0.05


def test_per_tensor_fp8_scales_and_refusals(fp8_dirs, tmp_path):
    """A per-tensor scale of a fused part fills that part's rows; other schemes are named."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from backplane.config.configs import ModelConfig
    from backplane.core.loader.model_loader import load_model
    from backplane.core.quantization import Fp8CheckpointLinear, UnsupportedQuantizationError

    quantized, _ = fp8_dirs
    per_tensor = tmp_path / "per-tensor"
    shutil.copytree(quantized, per_tensor)
    tensors = load_file(str(per_tensor / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        prefix = name.removesuffix(".weight_scale")
        w = tensors[f"{prefix}.weight"].float() * tensors[name]
        scale = w.abs().max() / 448
        tensors[f"{prefix}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        tensors[name] = scale.reshape(())
        tensors[f"{prefix}.input_scale"] = torch.tensor([0.5])
    save_file(tensors, str(per_tensor / "model.safetensors"))
    config = json.loads((per_tensor / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["weights"]["strategy"] = "tensor"
    group["input_activations"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                  "dynamic": False, "symmetric": True}
    (per_tensor / "config.json").write_text(json.dumps(config))
    model = load_model(ModelConfig(model=str(per_tensor)), "cpu")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8CheckpointLinear)
    sizes = list(qkv.output_sizes.values())
    scales = qkv.weight_scale.split(sizes)
    assert all(torch.all(s == s[0]) for s in scales)  # one scale per part, over its rows
    assert torch.equal(qkv.input_scale, torch.full((3,), 0.5))
    x = torch.randn(2, qkv.in_features)
    want = x @ (tensors["model.layers.0.self_attn.q_proj.weight"].float()
                * tensors["model.layers.0.self_attn.q_proj.weight_scale"]).T
    torch.testing.assert_close(qkv(x)[:, :sizes[0]], want, rtol=1e-5, atol=1e-5)
    group["weights"]["strategy"] = "block"
    (per_tensor / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="strategy 'block'"):
        LLM(model=str(per_tensor), max_model_len=64, num_kv_blocks=16)
    with pytest.raises(UnsupportedQuantizationError, match="format 'pack-quantized'"):
        from backplane.core.quantization import parse_quantization_config

        parse_quantization_config({"quant_method": "compressed-tensors",
                                   "format": "pack-quantized"})
