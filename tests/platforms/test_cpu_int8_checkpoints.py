"""compressed-tensors int8 checkpoints (``format: int-quantized``) on the cpu platform's
int8 kernels: the config's parsing and refusals, the layer against its dequantized
weight, whole models against their dequantized float twins (written by
``bench make-model``'s writer and by the compressed-tensors package itself), and
``bench make-model --quantize int8``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.core.loader.weights import CheckpointTensor
from backplane.core.quantization import (
    Int8CheckpointLinear,
    UnsupportedQuantizationError,
    parse_quantization_config,
)
from backplane.platforms.cpu.linear import Int8Linear, bf16_gemm_supported
from backplane.platforms.cpu.platform import CpuPlatform
from tests.platforms.test_cpu_int8 import _block_quantized

needs_kernel = pytest.mark.skipif(not bf16_gemm_supported(),
                                  reason="no AVX512-BF16 (or no C compiler) on this CPU")
PROMPT = "the quick brown fox jumps over the lazy dog and runs into the forest near the river"
INT8 = {"num_bits": 8, "type": "int", "symmetric": True}
W8A8_INPUTS = {**INT8, "strategy": "token", "dynamic": True}


def _config(weights: dict | None = None, inputs: dict | None = W8A8_INPUTS, **top) -> dict:
    group = {"targets": ["Linear"], "weights": weights or {**INT8, "strategy": "channel"},
             "input_activations": inputs}
    return {"quant_method": "compressed-tensors", "format": "int-quantized",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"], **top}


# --- parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize(("inputs", "w8a8"), [(W8A8_INPUTS, True), (None, False)])
@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_int8_schemes_parse(inputs, w8a8, strategy):
    spec = parse_quantization_config(_config({**INT8, "strategy": strategy}, inputs))
    assert (spec.method, spec.weight_type, spec.weight_strategy) == (
        "compressed-tensors", "int", strategy)
    assert spec.int8_activations is w8a8 and not spec.static_input_scale
    assert spec.skips("lm_head") and not spec.skips("model.layers.0.mlp.down_proj")


@pytest.mark.parametrize(("weights", "inputs", "message"), [
    ({**INT8, "symmetric": False, "strategy": "channel"}, None,
     r"int8 checkpoint: weights.symmetric False .*symmetric only"),
    ({**INT8, "strategy": "group", "group_size": 128}, None,
     r"weights.strategy 'group' is not supported \(static symmetric 'channel' or 'tensor'"),
    (None, {**INT8, "strategy": "tensor", "dynamic": False},
     r"input_activations.dynamic False is not supported"),
    (None, {**W8A8_INPUTS, "symmetric": False}, r"input_activations.symmetric False"),
    (None, {**W8A8_INPUTS, "strategy": "tensor"}, r"input_activations.strategy 'tensor'"),
    ({**INT8, "num_bits": 4, "strategy": "channel"}, None,
     r"weights.num_bits 4 is not supported \(format 'int-quantized' holds 8-bit int"),
    ({**INT8, "type": "float", "strategy": "channel"}, None, r"weights.type 'float'"),
])
def test_int8_refusals_name_the_field(weights, inputs, message):
    with pytest.raises(UnsupportedQuantizationError, match=message):
        parse_quantization_config(_config(weights, inputs))


def test_mixed_formats_are_refused():
    config = _config()
    config["config_groups"]["group_0"]["format"] = "float-quantized"
    with pytest.raises(UnsupportedQuantizationError, match="config_groups format"):
        parse_quantization_config(config)


# --- the layer ----------------------------------------------------------------------------

PARTS = {"q": 64, "k": 32, "v": 32}


def _fused_layer(activations: str, in_features: int = 96, bias: bool = True):
    """A fused q/k/v int8 layer loaded through ``load_checkpoint_tensor``: per-channel
    scales for q and v, a per-tensor one for k (each part has its own), and the dense
    float32 weight those tensors mean."""
    spec = parse_quantization_config(_config(inputs=W8A8_INPUTS if activations == "int8"
                                             else None))
    layer = Int8CheckpointLinear(spec, in_features, sum(PARTS.values()), output_sizes=PARTS,
                                 bias=bias, dtype=torch.float32, name="qkv_proj")
    gen = torch.Generator().manual_seed(len(PARTS) + in_features)
    dense = []
    for index, (part, rows) in enumerate(PARTS.items()):
        q = torch.randint(-128, 128, (rows, in_features), generator=gen, dtype=torch.int8)
        scale = (torch.rand(rows, 1, generator=gen) + 0.5) * 10.0 ** -(index + 2)
        if part == "k":
            scale = scale[:1, 0]  # per tensor: [1]
        layer.load_checkpoint_tensor("weight", part, CheckpointTensor.from_tensor("w", q))
        layer.load_checkpoint_tensor("weight_scale", part,
                                     CheckpointTensor.from_tensor("s", scale))
        dense.append(q.float() * scale.reshape(-1, 1))
    b = torch.randn(sum(PARTS.values()), generator=gen) if bias else None
    if bias:
        layer.load_checkpoint_tensor("bias", None, CheckpointTensor.from_tensor("b", b))
    return layer, torch.cat(dense), b


def test_int8_layer_reference_before_a_platform():
    layer, dense, b = _fused_layer("int8")
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), x @ dense.T + b, rtol=1e-5, atol=1e-5)


def test_a_float_weight_is_not_cast_into_an_int8_layer():
    layer, _, _ = _fused_layer("bf16")
    with pytest.raises(ValueError, match="must be torch.int8"):
        layer.load_checkpoint_tensor("weight", "q", CheckpointTensor.from_tensor(
            "model.q_proj.weight", torch.zeros(64, 96)))


@needs_kernel
@pytest.mark.parametrize("activations", ["int8", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_layer_on_the_kernel_matches_its_dequantized_weight(activations, bias):
    """The checkpoint's int8 values and scales reach the kernel unchanged, and the kernel
    computes exactly with them (W8A8: on the block-quantized activations) up to float32
    summation order."""
    layer, dense, b = _fused_layer(activations, bias=bias)
    assert layer.use_platform_kernels(CpuPlatform().make_quantized_linear)
    kernel = layer.kernels[0]
    assert isinstance(kernel, Int8Linear) and kernel.activations == activations
    assert torch.equal(kernel.dequantized_weight(), dense)  # no requantization
    x = torch.randn(5, 96)
    seen = x.bfloat16().float()
    seen = _block_quantized(seen) if activations == "int8" else seen
    want = seen @ dense.T + (b if bias else 0)
    got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@needs_kernel
def test_w8a8_layer_too_narrow_for_the_blocks_runs_the_reference(caplog):
    layer, dense, b = _fused_layer("int8", in_features=48)
    with caplog.at_level(logging.WARNING, logger="backplane.platforms.cpu.platform"):
        assert not layer.use_platform_kernels(CpuPlatform().make_quantized_linear)
    assert "int8 layer on the reference path" in caplog.text and "multiple of 32" in caplog.text
    x = torch.randn(2, 48)
    torch.testing.assert_close(layer(x), x @ dense.T + b, rtol=1e-5, atol=1e-5)


# --- whole models -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_dirs(tiny_model_factory, tmp_path_factory):
    """Tiny float32 Llama -> compressed-tensors int8 (W8A8 and W8A16, per channel), each
    with its dequantized twin, by make-model's writer."""
    from backplane.benchmarks.make_model import quantize_checkpoint

    root = tmp_path_factory.mktemp("int8ckpt")
    dirs = {}
    for scheme in ("int8", "int8-weight-only"):
        quantized, dense = root / scheme, root / f"{scheme}-dequantized"
        quantize_checkpoint(tiny_model_factory("llama"), str(quantized), scheme,
                            dequantized_dir=str(dense))
        dirs[scheme] = (str(quantized), str(dense))
    return dirs


def _checkpoint_int8_weight(model_dir: str, prefix: str) -> torch.Tensor:
    """scale x int8 of checkpoint layer ``prefix``, as stored."""
    from safetensors.torch import load_file

    tensors = load_file(f"{model_dir}/model.safetensors")
    return tensors[f"{prefix}.weight"].float() * tensors[f"{prefix}.weight_scale"].float()


def _greedy(model_dir: str, inspect=None):
    """Greedy completion of PROMPT (with logprobs); ``inspect(engine)`` sees the loaded
    engine first."""
    llm = LLM(model=model_dir, max_model_len=128, num_kv_blocks=32)
    if inspect is not None:
        inspect(llm.llm_engine)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    del llm
    return out


def _check_int8_kernels(engine, quantized: str, activations: str) -> None:
    """Every decoder linear is on an int8 kernel holding the checkpoint's int8 values."""
    assert engine.config.model_config.quantization == "compressed-tensors"
    model = engine.engine_core.model_runner.model
    kernels = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(kernels) == 4 * 2  # q/k/v, o, gate/up, down in each of the 2 layers
    assert all(k.activations == activations for k in kernels)
    want = torch.cat([_checkpoint_int8_weight(quantized, f"model.layers.0.self_attn.{p}_proj")
                      for p in "qkv"])
    qkv = model.model.layers[0].self_attn.qkv_proj.kernels[0]
    assert torch.equal(qkv.dequantized_weight(), want)


def _check_matches_twin(quantized: str, dense: str, activations: str) -> None:
    """Greedy tokens equal to the dequantized twin's, logprobs within the fp8 test's
    tolerance (activations are rounded to bf16 and, W8A8, to int8 blocks: close, not
    exact)."""
    a = _greedy(quantized, lambda engine: _check_int8_kernels(engine, quantized, activations))
    b = _greedy(dense)
    assert a.token_ids == b.token_ids
    diffs = [abs(x[t].logprob - y[t].logprob)
             for x, y, t in zip(a.logprobs, b.logprobs, a.token_ids, strict=True)]
    assert max(diffs) < 0.05, diffs


@needs_kernel
@pytest.mark.parametrize(("scheme", "activations"),
                         [("int8", "int8"), ("int8-weight-only", "bf16")])
def test_int8_checkpoint_matches_dequantized_twin(int8_dirs, scheme, activations):
    _check_matches_twin(*int8_dirs[scheme], activations)


def _write_with_compressed_tensors(src: str, out: str) -> None:
    """W8A8 (per-channel int8 weights, dynamic per-token int8 activations) written by the
    compressed-tensors package's own compressor, scales set as a min-max observer
    would (no calibration data needed for weights)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**INT8, strategy="channel"),
        input_activations=QuantizationArgs(**W8A8_INPUTS))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                amax = module.weight.abs().amax(dim=1, keepdim=True)
                module.weight_scale.copy_(amax / 127)
    compressor = ModelCompressor.from_pretrained_model(model, "int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for path in Path(src).iterdir():  # the tokenizer's files
        if not (Path(out) / path.name).exists():
            shutil.copy(path, out)


def _dequantized_twin(quantized: str, out: str) -> None:
    """``quantized`` with every int8 weight replaced by scale x int8 (float32), no
    quantization_config."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(quantized, out)
    tensors = load_file(f"{out}/model.safetensors")
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        prefix = name.removesuffix(".weight_scale")
        tensors[f"{prefix}.weight"] = _checkpoint_int8_weight(quantized, prefix)
        del tensors[name]
    save_file(tensors, f"{out}/model.safetensors", metadata={"format": "pt"})
    config = json.loads(open(f"{out}/config.json").read())
    del config["quantization_config"]
    with open(f"{out}/config.json", "w") as f:
        json.dump(config, f)


@needs_kernel
def test_checkpoint_written_by_compressed_tensors(tiny_model_factory, tmp_path):
    pytest.importorskip("compressed_tensors")
    src = tiny_model_factory("llama")
    quantized, dense = str(tmp_path / "ct-w8a8"), str(tmp_path / "ct-w8a8-dequantized")
    _write_with_compressed_tensors(src, quantized)
    config = json.loads(open(f"{quantized}/config.json").read())["quantization_config"]
    assert config["format"] == "int-quantized"
    _dequantized_twin(quantized, dense)
    _check_matches_twin(quantized, dense, "int8")


# --- bench make-model ---------------------------------------------------------------------

@pytest.mark.parametrize(("scheme", "inputs"), [("int8", True), ("int8-weight-only", False)])
def test_make_model_cli_quantize_int8(tmp_path, scheme, inputs):
    from safetensors import safe_open

    from backplane.entrypoints.cli.main import main

    out = tmp_path / f"tiny-{scheme}"
    assert main(["bench", "make-model", str(out), "--shape", "tiny", "--quantize",
                 scheme]) == 0
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    spec = parse_quantization_config(raw)
    assert (spec.weight_type, spec.weight_strategy, spec.int8_activations) == (
        "int", "channel", inputs)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
    assert torch.equal(q.abs().amax(dim=1), torch.full((q.shape[0],), 127, dtype=torch.int8))
