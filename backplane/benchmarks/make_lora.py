"""`backplane bench make-lora`: a random PEFT LoRA adapter for a Llama-family model, offline.

Written in PEFT's own layout (``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A/B.weight``
tensors), so any PEFT-reading engine can load it. The weights are random
(A and B both non-zero), which is what a throughput measurement needs: the
adapter's cost, not its quality.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each target projection of one decoder layer."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


def make_lora(base_dir: str, out_dir: str, rank: int = 16, alpha: float | None = None,
              seed: int = 0, targets: tuple[str, ...] = TARGETS,
              dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write a random rank-``rank`` adapter of ``base_dir``'s model to ``out_dir``."""
    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    shapes = _shapes(config)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"targets {unknown} are not projections of a Llama-family layer; "
                         f"known: {list(shapes)}")
    if rank < 1:
        raise ValueError(f"rank ({rank}) must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name in targets:
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            fan_in, fan_out = shapes[name]
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(fan_out, rank, generator=generator) * 0.01).to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "base_model_name_or_path": os.path.abspath(base_dir),
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2)
    return {"base": base_dir, "out": out_dir, "rank": rank, "targets": ",".join(targets),
            "tensors": len(tensors)}
