"""GPTQ / AWQ 4-bit checkpoints on the cpu platform: the int4 kernel against the
dequantized weight, whole models against their dequantized float twins, the
config's detection and refusals, and ``bench make-model --quantize``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.benchmarks.make_model import quantize_checkpoint
from backplane.core.quantization.packing import quantize_rtn
from backplane.platforms.cpu.int4 import Int4Linear, int4_kernel_supported
from backplane.platforms.cpu.linear import runnable_gemm_isas
from backplane.platforms.cpu.platform import CpuPlatform
from backplane.plugins_sdk.quantization import Int4Weights
from tests.platforms.prompt_logprobs import prompt_logprob_gaps

needs_kernel = pytest.mark.skipif(not int4_kernel_supported(),
                                  reason="neither AVX512-BF16 nor AVX2 (or no C compiler) here")
# The int4 kernels this CPU runs (with AMX, 16+ bf16 rows go through the tiles; an
# AVX-512 CPU runs the AVX2 kernel too).
INT4_ISAS = runnable_gemm_isas() or [None]
PROMPTS = ["the quick brown fox jumps over the lazy dog",
           "Paged attention stores keys and values in fixed-size blocks"]


def _weights(n: int, k: int, group: int, sym: bool, act_order: bool, bias: bool,
             seed: int = 0) -> Int4Weights:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    q, zeros, scales = quantize_rtn(w, group, sym=sym)
    return Int4Weights(q, scales, zeros, group,
                       perm=torch.randperm(k, generator=gen) if act_order else None,
                       bias=torch.randn(n, generator=gen) if bias else None)


@needs_kernel
@pytest.mark.parametrize(("rows", "n", "k", "group"),
                         [(1, 1152, 896, 128), (3, 40, 64, 32), (9, 37, 128, 128),
                          (17, 160, 96, 32), (70, 48, 256, 64)])
@pytest.mark.parametrize(("sym", "act_order"), [(True, False), (False, False), (True, True),
                                                (False, True)])
@pytest.mark.parametrize("isa", INT4_ISAS)
def test_int4_layer_matches_dequantized_weight(rows, n, k, group, sym, act_order, isa):
    """float32 activations: exact dequantization, float32 summation-order differences only.
    bf16 activations: within the bf16 output's rounding (and, from 16 rows, the weight
    rounded to bf16 in the dequantized-tile path)."""
    weights = _weights(n, k, group, sym, act_order, bias=n % 2 == 0)
    layer = Int4Linear(weights, isa=isa)
    dense = weights.dequantize()
    x = torch.randn(rows, k)
    want = x @ dense.T + (weights.bias if weights.bias is not None else 0)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    want_b = xb.float() @ dense.T + (weights.bias if weights.bias is not None else 0)
    got_b = layer(xb)
    assert got_b.dtype == torch.bfloat16
    scale = want_b.abs().max().item()
    tol = (2 ** -8 if rows < 16 else 2 ** -6) * scale
    assert (got_b.float() - want_b).abs().max().item() <= tol


@needs_kernel
@pytest.mark.parametrize("act_order", [False, True])
def test_avx2_int4_rows_result_does_not_depend_on_its_batch(act_order):
    """The AVX2 kernel sums every row in one order whatever the call's row count (batch
    1 takes two blocks per tile, more rows three rows per tile), bit for bit, for bf16
    and float32 activations, so greedy decoding alone, batched and verifying speculative
    drafts picks the same token. (The AVX-512 kernel rounds the dequantized weight to
    bf16 from 16 rows on, docs/cpu_platform.md.)"""
    weights = _weights(200, 256, 64, sym=False, act_order=act_order, bias=True, seed=5)
    layers = [Int4Linear(weights, isa="avx2"), Int4Linear(weights, float_output=True, isa="avx2")]
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(70, 256).to(dtype)
        for layer in layers:
            batched = layer(x)
            for rows in (slice(0, 1), slice(5, 6), slice(69, 70), slice(0, 2), slice(7, 10),
                         slice(0, 4), slice(60, 67)):
                assert torch.equal(layer(x[rows]), batched[rows]), (dtype, rows)


@needs_kernel
def test_int4_layer_keeps_leading_dims_and_empty_batches():
    weights = _weights(24, 32, 16, True, False, bias=True)
    layer = Int4Linear(weights)
    x = torch.randn(2, 3, 32)
    assert layer(x).shape == (2, 3, 24)
    assert layer(torch.zeros(0, 32)).shape == (0, 24)


@pytest.fixture(scope="module")
def quantized_dirs(tiny_model_factory, tmp_path_factory):
    """Tiny float32 Llama (hidden 64) -> GPTQ (sym, act-order), GPTQ (asym), AWQ, each
    with its dequantized float32 twin."""
    src = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("int4")
    dirs = {}
    for name, scheme, kw in [("gptq-act-order", "gptq-int4", dict(desc_act=True)),
                             ("gptq-asym", "gptq-int4", dict(sym=False)),
                             ("awq", "awq-int4", {})]:
        quantized, dense = root / name, root / f"{name}-dequantized"
        quantize_checkpoint(src, str(quantized), scheme, group_size=32,
                            dequantized_dir=str(dense), **kw)
        dirs[name] = (str(quantized), str(dense))
    return dirs


@needs_kernel
@pytest.mark.parametrize("name", ["gptq-act-order", "gptq-asym", "awq"])
def test_quantized_model_matches_its_dequantized_twin(quantized_dirs, name):
    """Greedy output token for token in float32, and close logprobs."""
    quantized, dense = quantized_dirs[name]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0)
    outs = {}
    for model in (quantized, dense):
        llm = LLM(model=model, max_model_len=128, num_kv_blocks=32)
        if model == quantized:
            runner = llm.llm_engine.engine_core.model_runner
            assert llm.llm_engine.config.model_config.quantization == name.split("-")[0]
            # q/k/v, o, gate/up, down in each of the 2 layers
            assert sum(isinstance(m, Int4Linear) for m in runner.model.modules()) == 8
        outs[model] = llm.generate(PROMPTS, params, use_tqdm=False)
        del llm
    for a, b in zip(outs[quantized], outs[dense], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs,
                             a.outputs[0].token_ids, strict=True):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-4


@needs_kernel
def test_bf16_quantized_model_tracks_float(quantized_dirs):
    quantized, dense = quantized_dirs["awq"]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = {}
    for model in (quantized, dense):
        llm = LLM(model=model, dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
        outs[model] = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
        del llm
    a, b = outs[quantized], outs[dense]
    diffs = prompt_logprob_gaps(a, b)
    assert sum(diffs) / len(diffs) < 0.05, diffs


def test_explicit_method_must_match_and_refusals(quantized_dirs, llama_model_dir, tmp_path,
                                                 monkeypatch):
    gptq, _ = quantized_dirs["gptq-asym"]
    with pytest.raises(ValueError, match=r"quantization \('awq'\) does not match.*'gptq'"):
        LLM(model=gptq, max_model_len=64, num_kv_blocks=16, quantization="awq")
    with pytest.raises(ValueError, match=r"quantization \('int8'\) does not match"):
        LLM(model=gptq, max_model_len=64, num_kv_blocks=16, quantization="int8")
    with pytest.raises(ValueError, match=r"quantization \('gptq'\) needs a gptq checkpoint"):
        LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=16, quantization="gptq")
    bad = tmp_path / "gptq3"
    shutil.copytree(gptq, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gptq checkpoints with bits=3 are not supported"):
        LLM(model=str(bad), max_model_len=64, num_kv_blocks=16)
    monkeypatch.setattr(CpuPlatform, "supported_quantization", property(lambda self: ()))
    with pytest.raises(ValueError, match=r"quantization \('gptq'\) has no kernel on platform "
                                         r"'cpu'"):
        LLM(model=gptq, max_model_len=64, num_kv_blocks=16)


@needs_kernel
def test_explicit_matching_method_loads(quantized_dirs):
    awq, _ = quantized_dirs["awq"]
    llm = LLM(model=awq, max_model_len=64, num_kv_blocks=16, quantization="awq")
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2


def test_platform_without_kernel_runs_the_reference(quantized_dirs):
    """A platform whose make_quantized_linear returns None still computes correctly."""
    from backplane.core.quantization import Int4CheckpointLinear
    from backplane.plugins_sdk import Platform

    gptq, _ = quantized_dirs["gptq-act-order"]
    from backplane.config.configs import ModelConfig
    from backplane.core.loader.model_loader import load_model

    model = load_model(ModelConfig(model=gptq), "cpu")
    layers = [m for m in model.modules() if isinstance(m, Int4CheckpointLinear)]
    x = torch.randn(2, layers[0].in_features)
    before = layers[0](x)
    base = Platform.__new__(Platform)
    assert base.prepare_quantized_layers(model) == 0  # reference path, no platform kernel
    torch.testing.assert_close(layers[0](x), before)


def test_make_model_cli_quantize(tmp_path, capsys):
    from backplane.entrypoints.cli.main import main

    out = tmp_path / "tiny-gptq"
    assert main(["bench", "make-model", str(out), "--shape", "tiny", "--quantize", "gptq-int4",
                 "--group-size", "64", "--json", str(tmp_path / "summary.json")]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["group_size"] == 64
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quantized_layers"] == 2 * 7
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in names
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert main(["bench", "make-model", str(tmp_path / "x"), "--quantize", "int3"]) == 2
    assert "--quantize int3: not one of" in capsys.readouterr().err


@needs_kernel
@pytest.mark.parametrize("head", ["int4", "int8"])
def test_opt_in_output_head_quantization(quantized_dirs, monkeypatch, head):
    """BACKPLANE_CPU_HEAD_QUANTIZATION quantizes the (float) output head too."""
    from backplane.platforms.cpu.linear import Int8Linear

    quantized, _ = quantized_dirs["gptq-asym"]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = {}
    for setting in (None, head):
        if setting:
            monkeypatch.setenv("BACKPLANE_CPU_HEAD_QUANTIZATION", setting)
        llm = LLM(model=quantized, dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
        model = llm.llm_engine.engine_core.model_runner.model
        kind = Int4Linear if head == "int4" else Int8Linear
        heads = [m for m in model.modules() if isinstance(m, kind)
                 and getattr(m, "float_output", False)]
        assert len(heads) == (1 if setting else 0)
        outs[setting] = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
        del llm
    a, b = outs[None], outs[head]
    diffs = prompt_logprob_gaps(a, b)
    assert sum(diffs) / len(diffs) < 0.1, diffs
