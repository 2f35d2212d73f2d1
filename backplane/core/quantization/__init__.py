"""Quantized checkpoints (GPTQ, AWQ 4-bit; compressed-tensors fp8 and int8): config
parsing, packed layouts, loading layers.

Platform-neutral: the kernels that run the layers come from the platform
(`Platform.make_quantized_linear`, see backplane/plugins_sdk/quantization.py).
"""

from backplane.core.quantization.config import (
    CHECKPOINT_METHODS,
    CheckpointQuantization,
    UnsupportedQuantizationError,
    parse_quantization_config,
    quant_method,
)
from backplane.core.quantization.layers import (
    Fp8CheckpointLinear,
    Int4CheckpointLinear,
    Int8CheckpointLinear,
    Int8Weights,
    checkpoint_quantization,
    quantize_checkpoint_layers,
)

__all__ = [
    "CHECKPOINT_METHODS",
    "CheckpointQuantization",
    "Fp8CheckpointLinear",
    "Int4CheckpointLinear",
    "Int8CheckpointLinear",
    "Int8Weights",
    "UnsupportedQuantizationError",
    "checkpoint_quantization",
    "parse_quantization_config",
    "quant_method",
    "quantize_checkpoint_layers",
]
