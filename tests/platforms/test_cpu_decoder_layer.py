"""The CPU platform's one-call decoder layer (platforms/cpu/decoder_layer.py): decode
steps run all of a model's plain decoder layers in one C call (or each layer as one
call), bit for bit what the modules give; everything else (prefill, mixed batches,
layers it has no kernel for) runs the modules."""

from __future__ import annotations

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.benchmarks.make_model import quantize_checkpoint
from backplane.platforms.cpu import native
from backplane.platforms.cpu.decoder_layer import DecoderLayerRunner, DecoderStackRunner
from backplane.platforms.cpu.gated_mlp import FusedGateUpSilu
from backplane.platforms.cpu.int4 import int4_kernel_supported
from backplane.platforms.cpu.linear import gemm_isa
from tests.fixtures.tiny_moe import make_tiny_moe_model

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def _layers(llm: LLM) -> list[torch.nn.Module]:
    model = llm.llm_engine.engine_core.model_runner.model
    return [m for m in model.modules() if getattr(type(m), "layer_kind", None) == "decoder_layer"]


def _stack_runner(llm: LLM):
    return llm.llm_engine.engine_core.model_runner.model.model.stack_runner


@pytest.fixture
def runner_calls(monkeypatch):
    """Counts of the runners' answers: {"ran": n, "declined": n} for the layers' runners,
    {"stack ran": n, "stack declined": n} for the model's stack runner."""
    counts = {"ran": 0, "declined": 0, "stack ran": 0, "stack declined": 0}
    for cls, prefix in ((DecoderLayerRunner, ""), (DecoderStackRunner, "stack ")):
        def counted(self, *args, original=cls.__call__, prefix=prefix):
            out = original(self, *args)
            counts[prefix + ("declined" if out is None else "ran")] += 1
            return out

        monkeypatch.setattr(cls, "__call__", counted)
    return counts


def _run(model_dir: str, **engine) -> tuple[LLM, list]:
    # 7 prompts of different lengths through 3 sequences and a small KV cache: decode
    # batches of 1-3, prefills chunked beside decodes, a shared prefix, preemption
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=128, max_num_seqs=3,
              max_num_batched_tokens=32, num_kv_blocks=9, enable_prefix_caching=True,
              **engine)
    shared = list(range(5, 37))
    prompts = [{"prompt_token_ids": shared + list(range(40 + i, 40 + i + 3 * i + 1))}
               for i in range(7)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [(o.outputs[0].token_ids,
                  [sorted((k, v.logprob) for k, v in step.items()) for step in o.outputs[0].logprobs])
                 for o in outputs]


@pytest.mark.parametrize("arch,checkpoint,engine", [
    ("llama", None, {}),
    ("qwen2", None, {}),  # q/k/v biases, tied embeddings
    ("mistral", None, {"kv_cache_dtype": "fp8"}),
    ("llama", None, {"quantization": "int8"}),
    ("qwen2", None, {"quantization": "int8_weight_only"}),
    ("llama", None, {"quantization": "fp8"}),
    ("qwen2", "gptq-int4", {}),  # one int4 GEMM per q/k/v and gate/up part
    ("llama", "awq-int4", {}),
    ("llama", "int8", {}),  # a compressed-tensors W8A8 checkpoint
])
def test_decode_steps_run_each_layer_in_one_call_bit_for_bit(
        arch, checkpoint, engine, tiny_model_factory, tmp_path, runner_calls, monkeypatch):
    model_dir = tiny_model_factory(arch)
    if checkpoint is not None:
        if checkpoint.endswith("int4") and not int4_kernel_supported():
            pytest.skip("no int4 kernel on this CPU")
        quantize_checkpoint(model_dir, str(tmp_path / checkpoint), checkpoint, group_size=32)
        model_dir = str(tmp_path / checkpoint)
    fused, got = _run(model_dir, **engine)
    layers = _layers(fused)
    assert layers and all(isinstance(m.block_runner, DecoderLayerRunner) for m in layers)
    assert isinstance(_stack_runner(fused), DecoderStackRunner)
    # every decode step ran all layers in one C call, every prefill or mixed step
    # declined to the layers' runners, which declined to the modules
    assert runner_calls["stack ran"] > 0 and runner_calls["stack declined"] > 0
    assert runner_calls["ran"] == 0
    assert runner_calls["declined"] == runner_calls["stack declined"] * len(layers)
    monkeypatch.setenv("BACKPLANE_CPU_DECODER_STACK", "0")
    by_layer, got_by_layer = _run(model_dir, **engine)
    assert _stack_runner(by_layer) is None
    assert runner_calls["ran"] > 0 and runner_calls["ran"] % len(layers) == 0
    monkeypatch.setenv("BACKPLANE_CPU_DECODER_LAYER", "0")
    plain, want = _run(model_dir, **engine)
    assert all(m.block_runner is None for m in _layers(plain)) and _stack_runner(plain) is None
    assert got == want and got_by_layer == want  # token ids and logprobs, bit for bit


def test_layers_without_c_kernels_keep_their_modules(tiny_model_factory, tmp_path):
    """float32 models (transformers' numerics), q/k-norm layers (Qwen3), mixture-of-
    experts layers, act-order GPTQ layers (activations gathered first) and LoRA-enabled
    engines (adapters wrap the linear layers after the platform prepared them) run the
    modules; so does a layer whose parts are not the platform's own."""
    float32 = LLM(model=tiny_model_factory("llama"), max_model_len=128, num_kv_blocks=16)
    assert all(m.block_runner is None for m in _layers(float32))
    assert _stack_runner(float32) is None
    qk_norm = LLM(model=tiny_model_factory("qwen3"), dtype="bfloat16", max_model_len=128,
                  num_kv_blocks=16)
    assert all(m.block() is None and m.block_runner is None for m in _layers(qk_norm))
    moe = LLM(model=make_tiny_moe_model(tmp_path / "mixtral", "mixtral"), dtype="bfloat16",
              max_model_len=128, num_kv_blocks=16)
    assert all(m.block() is None and m.block_runner is None for m in _layers(moe))
    lora = LLM(model=tiny_model_factory("llama"), dtype="bfloat16", max_model_len=128,
               num_kv_blocks=16, enable_lora=True, max_lora_rank=8)
    assert all(m.block_runner is None and m.mlp.gate_up_activation is None
               for m in _layers(lora)) and _stack_runner(lora) is None
    if int4_kernel_supported():
        act_order = str(tmp_path / "act-order")
        quantize_checkpoint(tiny_model_factory("llama"), act_order, "gptq-int4", group_size=32,
                            desc_act=True)
        gptq = LLM(model=act_order, dtype="bfloat16", max_model_len=128, num_kv_blocks=16)
        assert all(m.block_runner is None for m in _layers(gptq))
    block = _layers(float32)[0].block()
    assert block is not None and DecoderLayerRunner.for_block(block, None) is None


@pytest.mark.skipif(gemm_isa() != "avx512_bf16", reason="the fused gate/up GEMM is AVX512-BF16's")
def test_gate_up_gemm_runs_with_silu_fused_bit_for_bit(tiny_model_factory, runner_calls,
                                                       monkeypatch):
    """On the AVX512-BF16 kernels each layer's gate/up GEMM writes SiLU-and-mul's output
    directly (gemm_bf16_silu); BACKPLANE_CPU_FUSED_GATE_UP=0 runs the two steps, with
    the same bits."""
    model_dir = tiny_model_factory("qwen2")
    module_path = {"ran": 0}
    original = FusedGateUpSilu.__call__

    def counted(self, x):
        out = original(self, x)
        module_path["ran"] += out is not None
        return out

    monkeypatch.setattr(FusedGateUpSilu, "__call__", counted)
    fused, got = _run(model_dir)
    assert all(m.block_runner._layer.gate_up_silu for m in _layers(fused))
    assert all(isinstance(m.mlp.gate_up_activation, FusedGateUpSilu) for m in _layers(fused))
    # decode steps fused in C, prefill and mixed steps through the MLP's hook
    assert runner_calls["stack ran"] > 0 and runner_calls["declined"] > 0
    assert module_path["ran"] > 0
    monkeypatch.setenv("BACKPLANE_CPU_FUSED_GATE_UP", "0")
    plain, want = _run(model_dir)
    assert all(m.block_runner is not None and not m.block_runner._layer.gate_up_silu
               and m.mlp.gate_up_activation is None for m in _layers(plain))
    assert got == want


@pytest.mark.skipif(gemm_isa() != "avx512_bf16", reason="the fused gate/up GEMM is AVX512-BF16's")
def test_fused_gate_up_hook_matches_the_modules_and_declines_what_it_cannot_run(
        tiny_model_factory):
    """The MLP hook gives act(gate_up_proj(x)) bit for bit for two or more bf16 rows and
    declines (None: the modules run) one row, other dtypes, column-strided input and a
    projection replaced after it was set."""
    llm = LLM(model=tiny_model_factory("qwen2"), dtype="bfloat16", max_model_len=128,
              num_kv_blocks=16)
    mlp = _layers(llm)[0].mlp
    hook = mlp.gate_up_activation
    assert isinstance(hook, FusedGateUpSilu)
    torch.manual_seed(0)
    hidden = mlp.gate_up_proj.in_features
    for rows in (2, 9, 33):
        x = torch.randn(rows, hidden, dtype=torch.bfloat16)
        assert torch.equal(hook(x), mlp.act(mlp.gate_up_proj(x)))
    assert hook(torch.randn(1, hidden, dtype=torch.bfloat16)) is None
    assert hook(torch.randn(4, hidden)) is None
    assert hook(torch.randn(hidden, 4, dtype=torch.bfloat16).t()) is None
    x = torch.randn(5, hidden, dtype=torch.bfloat16)
    want = mlp.down_proj(mlp.act(mlp.gate_up_proj(x)))
    assert torch.equal(mlp(x), want)
    mlp.gate_up_proj = torch.nn.Linear(hidden, mlp.gate_up_proj.out_features,
                                       dtype=torch.bfloat16)
    assert hook(x) is None
    assert torch.equal(mlp(x), mlp.down_proj(mlp.act(mlp.gate_up_proj(x))))
