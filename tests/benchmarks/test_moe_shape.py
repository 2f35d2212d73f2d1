"""The ``mixtral-tiny`` bench shape: its size, and the MoE parameter count of the memory report."""

from __future__ import annotations

import torch

from backplane.benchmarks.make_model import SHAPES, build_config
from backplane.benchmarks.memory import num_parameters


def test_mixtral_tiny_shape_counts_every_expert():
    from transformers import AutoModelForCausalLM

    config = build_config(SHAPES["mixtral-tiny"], "bfloat16", 0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    actual = sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "MixtralForCausalLM"
    assert num_parameters(config) == actual
    assert 2.0e8 < actual < 2.3e8
