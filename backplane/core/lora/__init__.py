"""Multi-LoRA in the model runner: adapter slots on the device and the layers that use them.

`LoRAManager` wraps the base model's q/k/v/o and gate/up/down linears in
`LoRALinear` layers, keeps up to ``max_loras`` adapters resident in fixed
device slots, and tells the layers, once per step, which slot each token uses
(`backplane.plugins_sdk.lora.LoRAMapping`). The batched LoRA product itself is
the platform's op (`Platform.add_lora`). Loading adapter files and mapping
them onto these layers is `backplane.lora`'s job.
"""

from backplane.core.lora.layers import LoRALinear, LoRAStepState
from backplane.core.lora.manager import LoRAManager

__all__ = ["LoRALinear", "LoRAManager", "LoRAStepState"]
