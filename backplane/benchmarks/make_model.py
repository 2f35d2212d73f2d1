"""`backplane bench make-model`: a randomly initialised model of a real shape, no download.

The weights are random (normal(0, 0.02), norms at one), so the text a model
writes is noise, but every matmul, KV cache byte and vocabulary-sized softmax
costs exactly what the real model costs. The tokenizer is a byte-level BPE
trained here on a short built-in text; its vocabulary is smaller than the
model's (benchmarks use random token ids, and ids the tokenizer does not know
decode to nothing).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """One named model shape: the transformers config class and its arguments."""

    name: str
    architecture: str  # transformers config class name, e.g. "Qwen2Config"
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""


SHAPES: dict[str, ModelShape] = {
    "qwen2-0.5b": ModelShape(
        name="qwen2-0.5b",
        architecture="Qwen2Config",
        description="Qwen2-0.5B shape: Qwen2ForCausalLM, ~494M parameters, tied embeddings",
        config=dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
    ),
    "llama-1b": ModelShape(
        name="llama-1b",
        architecture="LlamaConfig",
        description="Llama-3.2-1B shape: LlamaForCausalLM, ~1.24B parameters, tied embeddings",
        config=dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "mixtral-tiny": ModelShape(
        name="mixtral-tiny",
        architecture="MixtralConfig",
        description="a small Mixtral shape: MixtralForCausalLM, ~213M parameters, 8 experts "
                    "with 2 active per token (~100M active), for the fused-MoE path",
        config=dict(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=64,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    ),
    "tiny": ModelShape(
        name="tiny",
        architecture="Qwen2Config",
        description="a few-MB Qwen2ForCausalLM for tests and CI",
        config=dict(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
    ),
}

# Special tokens of the local tokenizer; ChatML markers so chat templates work.
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tokenizer: written for this file, varied enough that
# BPE learns common English pieces, digits and punctuation.
TOKENIZER_TEXT = """
A serving engine spends its day moving numbers between memory and arithmetic units.
Every decode step reads each weight of the model once, multiplies it by a small batch of
activations, and writes one new key and value per layer for every running request.
When the batch is small the step is bound by memory bandwidth; when it is large the step
becomes bound by the matrix units, and the scheduler's job is to keep the batch large
without letting any single request wait too long for its first token.
The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 2048 and 3.14159 appear in logs.
Questions? Answers! Lists: apples, pears; plums - and (parentheses) [brackets] {braces}.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
{"role": "user", "content": "Hello, how are you today?"}
The weather was cold in the morning, warm in the afternoon, and windy by the evening.
Paged attention stores keys and values in fixed-size blocks, so memory is never wasted on
padding and identical prompt prefixes can share the same blocks between requests.
"""


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on TOKENIZER_TEXT, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the text so merges reach the requested size where the text allows it.
    core.train_from_iterator([TOKENIZER_TEXT] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(shape: ModelShape, dtype: str, eos_token_id: int):
    """The transformers config of ``shape`` with the tokenizer's eos id."""
    import transformers

    config_cls = getattr(transformers, shape.architecture)
    config = config_cls(
        **shape.config,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    config.dtype = dtype
    return config


def _init_weights_(model, seed: int) -> None:
    """normal(0, 0.02) for matrices, ones for norm scales, zeros for biases.

    Done directly on the parameters (one pass) because transformers' own init
    of a 0.5B model takes far longer than this and the values do not matter.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                # Draw in float32 chunks then cast: bf16 normal_ with a generator is slow.
                flat = param.view(-1)
                chunk = 1 << 24
                for start in range(0, flat.numel(), chunk):
                    part = flat[start : start + chunk]
                    part.copy_(torch.empty(part.numel()).normal_(0.0, 0.02, generator=gen))
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


# --quantize schemes: (quant_method, symmetric)
QUANTIZE_SCHEMES = {"gptq-int4": ("gptq", True), "awq-int4": ("awq", False),
                    "fp8": ("compressed-tensors", True), "int8": ("compressed-tensors", True),
                    "int8-weight-only": ("compressed-tensors", True)}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# compressed-tensors schemes: (format, weights' type, the largest quantized magnitude,
# whether dynamic per-token activations are declared), as llm-compressor's FP8_DYNAMIC,
# W8A8 and W8A16 presets write them.
_COMPRESSED_TENSORS = {"fp8": ("float-quantized", "float", FP8_MAX, True),
                       "int8": ("int-quantized", "int", 127.0, True),
                       "int8-weight-only": ("int-quantized", "int", 127.0, False)}


def _per_channel(weight, scheme: str):
    """``(w8 [N, K], scales [N, 1] float32)``, scale = max |w| / the format's maximum per
    row: float8_e4m3fn values for ``fp8``, rounded int8 ones for the int8 schemes."""
    import torch

    _, weight_type, qmax, _ = _COMPRESSED_TENSORS[scheme]
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scaled = (w / scales).clamp(-qmax, qmax)
    if weight_type == "float":
        return scaled.to(torch.float8_e4m3fn), scales
    return torch.round(scaled).to(torch.int8), scales


def _compressed_tensors_config(scheme: str) -> dict:
    """The ``quantization_config`` of a compressed-tensors checkpoint of ``scheme``."""
    fmt, weight_type, _, dynamic_inputs = _COMPRESSED_TENSORS[scheme]
    args = {"num_bits": 8, "type": weight_type, "symmetric": True}
    inputs = {**args, "strategy": "token", "dynamic": True} if dynamic_inputs else None
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {**args, "strategy": "channel", "dynamic": False},
                "input_activations": inputs}}}


def _permutation_key(name: str) -> str:
    """Layers fed the same activations (q/k/v, gate/up) share one act-order permutation."""
    parent, _, leaf = name.removesuffix(".weight").rpartition(".")
    family = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
              "up_proj": "gate_up"}.get(leaf, leaf)
    return f"{parent}.{family}"


def quantize_checkpoint(src_dir: str, out_dir: str, scheme: str, group_size: int = 128,
                        sym: bool | None = None, desc_act: bool = False, seed: int = 0,
                        dequantized_dir: str | None = None) -> dict:
    """Quantize a float safetensors checkpoint to a GPTQ or AWQ 4-bit one (round to
    nearest), or to a compressed-tensors one with one scale per output row: ``fp8``
    (e4m3 weights, dynamic per-token fp8 activations declared, as llm-compressor's
    FP8_DYNAMIC scheme writes), ``int8`` (symmetric int8 weights, dynamic per-token
    int8 activations: W8A8) or ``int8-weight-only`` (W8A16).

    Every 2-D ``.weight`` under ``model.layers.`` (the decoder's linear layers) is
    quantized per group of ``group_size`` input columns; embeddings, norms and the
    output head stay in float, as GPTQ/AWQ tools leave them. ``scheme`` is
    ``gptq-int4`` (symmetric by default; ``desc_act`` writes a random act-order
    permutation per input, shared by q/k/v and by gate/up, as calibration would)
    or ``awq-int4`` (asymmetric, zero points). ``out_dir`` may be ``src_dir``.
    With ``dequantized_dir``, the same model with the dequantized weights (float32
    math, stored in the checkpoint's dtype) is written there too: the float
    reference the quantized model must reproduce. Returns a summary.
    """
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from backplane.core.loader.weights import INDEX_FILE, safetensors_files
    from backplane.core.quantization.packing import (
        awq_pack,
        dequantize,
        gptq_pack,
        quantize_rtn,
    )

    if scheme not in QUANTIZE_SCHEMES:
        raise ValueError(f"quantize scheme {scheme!r} is not one of {sorted(QUANTIZE_SCHEMES)}")
    method, default_sym = QUANTIZE_SCHEMES[scheme]
    sym = default_sym if sym is None else sym
    if method == "compressed-tensors" and desc_act:
        raise ValueError(f"{scheme} has no act-order")
    if method == "awq" and (sym or desc_act):
        raise ValueError("awq-int4 is asymmetric (zero points) and has no act-order")
    files = safetensors_files(src_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    gen = torch.Generator().manual_seed(seed)
    perms: dict[tuple[str, int], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    count = 0
    for name, tensor in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith(".weight")
                and tensor.dim() == 2):
            out[name] = tensor
            dequantized[name] = tensor
            continue
        if any(part in name for part in (".experts.", ".gate.weight")):
            raise ValueError(f"{name}: mixture-of-experts checkpoints cannot be quantized "
                             "(Backplane does not load quantized experts)")
        n, k = tensor.shape
        if method == "compressed-tensors":
            w8, row_scales = _per_channel(tensor, scheme)
            out[name] = w8
            out[name.removesuffix(".weight") + ".weight_scale"] = row_scales
            dequantized[name] = (w8.float() * row_scales).to(tensor.dtype)
            count += 1
            continue
        if k % group_size:
            raise ValueError(f"{name}: in_features {k} is not a multiple of group_size "
                             f"{group_size}")
        g_idx = torch.arange(k) // group_size
        if desc_act:
            key = (_permutation_key(name), k)
            if key not in perms:
                perms[key] = torch.randperm(k, generator=gen)
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[perms[key]] = torch.arange(k) // group_size
        q, zeros, scales = quantize_rtn(tensor, group_size, sym=sym, g_idx=g_idx)
        prefix = name.removesuffix(".weight")
        if method == "gptq":
            qweight, qzeros, fp16_scales = gptq_pack(q, zeros, scales)
            out[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        else:
            qweight, qzeros, fp16_scales = awq_pack(q, zeros, scales)
        out[f"{prefix}.qweight"] = qweight
        out[f"{prefix}.qzeros"] = qzeros
        out[f"{prefix}.scales"] = fp16_scales
        dequantized[name] = dequantize(q, zeros, scales, g_idx=g_idx).to(tensor.dtype)
        count += 1
    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    if method == "gptq":
        qconfig = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                   "desc_act": desc_act, "sym": sym, "static_groups": False,
                   "true_sequential": True, "checkpoint_format": "gptq", "lm_head": False,
                   "damp_percent": 0.01, "backplane_round_to_nearest": True}
    elif method == "compressed-tensors":
        qconfig = _compressed_tensors_config(scheme)
    else:
        qconfig = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                   "zero_point": True, "version": "gemm", "modules_to_not_convert": None,
                   "backplane_round_to_nearest": True}

    def write(directory: str, weights: dict, quantization: dict | None) -> None:
        if os.path.abspath(directory) != os.path.abspath(src_dir):
            shutil.copytree(src_dir, directory, dirs_exist_ok=True)
        for path in safetensors_files(directory):
            os.unlink(path)
        if os.path.exists(os.path.join(directory, INDEX_FILE)):
            os.unlink(os.path.join(directory, INDEX_FILE))
        save_file({k: v.contiguous() for k, v in weights.items()},
                  os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(config)
        if quantization is None:
            cfg.pop("quantization_config", None)
        else:
            cfg["quantization_config"] = quantization
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    if dequantized_dir is not None:  # first: out_dir may overwrite src_dir
        write(dequantized_dir, dequantized, None)
    write(out_dir, out, qconfig)
    summary = {"quantization": scheme, "group_size": group_size, "sym": sym,
               "desc_act": desc_act, "quantized_layers": count,
               "quantized_bytes": sum(t.numel() * t.element_size() for t in out.values())}
    bench_json = os.path.join(out_dir, "backplane_bench_model.json")
    if os.path.abspath(out_dir) != os.path.abspath(src_dir) and os.path.exists(bench_json):
        with open(bench_json) as f:  # a copied make-model summary: describe this checkpoint
            described = json.load(f)
        described.update(summary, path=os.path.abspath(out_dir),
                         weight_bytes=summary["quantized_bytes"])
        with open(bench_json, "w") as f:
            json.dump(described, f, indent=2)
    return summary


def make_model(out_dir: str, shape: str = "tiny", dtype: str = "bfloat16", seed: int = 0,
               quantize: str | None = None, group_size: int = 128) -> dict:
    """Write a random model of ``shape`` plus tokenizer to ``out_dir``; returns a summary.

    ``quantize`` (``gptq-int4``, ``awq-int4``, ``fp8``, ``int8``, ``int8-weight-only``)
    then rewrites its decoder layers as a quantized checkpoint with round-to-nearest
    quantization (`quantize_checkpoint`).
    Raises ValueError naming the shape, dtype or scheme when it is unknown.
    """
    if quantize is not None and quantize not in QUANTIZE_SCHEMES:
        raise ValueError(f"--quantize {quantize}: not one of {sorted(QUANTIZE_SCHEMES)}")
    import torch
    from transformers import AutoModelForCausalLM

    from backplane.config.configs import parse_dtype

    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {sorted(SHAPES)}")
    torch_dtype = parse_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    spec = SHAPES[shape]
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)

    tokenizer = _train_tokenizer(min(spec.config["vocab_size"], 4096))
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = build_config(spec, dtype_name, eos_id)

    # Build on the meta device, then allocate real storage once: no HF init pass.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    _init_weights_(model, seed)
    # Non-persistent buffers (rotary inv_freq) are recomputed on load; the saved
    # checkpoint holds only parameters.
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    num_params = sum(p.numel() for p in model.parameters())
    summary = {
        "path": os.path.abspath(out_dir),
        "shape": shape,
        "architecture": type(model).__name__,
        "dtype": dtype_name,
        "num_parameters": num_params,
        "weight_bytes": num_params * torch_dtype.itemsize,
        "model_vocab_size": spec.config["vocab_size"],
        "tokenizer_vocab_size": len(tokenizer),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if quantize is not None:
        del model
        summary.update(quantize_checkpoint(out_dir, out_dir, quantize, group_size=group_size,
                                           seed=seed))
        summary["weight_bytes"] = summary.pop("quantized_bytes")
    with open(os.path.join(out_dir, "backplane_bench_model.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("wrote %s (%s, %.1fM parameters)", out_dir, shape, num_params / 1e6)
    return summary
