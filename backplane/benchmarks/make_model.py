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


def make_model(out_dir: str, shape: str = "tiny", dtype: str = "bfloat16", seed: int = 0) -> dict:
    """Write a random model of ``shape`` plus tokenizer to ``out_dir``; returns a summary.

    Raises ValueError naming the shape or dtype when it is unknown.
    """
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
    with open(os.path.join(out_dir, "backplane_bench_model.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("wrote %s (%s, %.1fM parameters)", out_dir, shape, num_params / 1e6)
    return summary
