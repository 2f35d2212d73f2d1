"""Multi-LoRA serving: adapter requests and PEFT adapter loading."""

from backplane.lora.adapter import (
    LoRAAdapterError,
    LoRATarget,
    LoRAWeights,
    check_adapter_config,
    load_lora_adapter,
    lora_targets,
)
from backplane.lora.request import LoRARequest

__all__ = [
    "LoRAAdapterError",
    "LoRARequest",
    "LoRATarget",
    "LoRAWeights",
    "check_adapter_config",
    "load_lora_adapter",
    "lora_targets",
]
