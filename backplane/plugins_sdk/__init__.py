"""The public contract between Backplane's core and platform plugins.

Plugins import only from this package. Everything here follows the SDK version
in `backplane.plugins_sdk.version.SDK_VERSION`: within a major version, members
are only added; a member that goes away is deprecated for one minor first
(see `backplane.plugins_sdk.deprecation`). docs/plugins.md states the promise.

Names are imported lazily (PEP 562) so that a plugin's descriptor module, which
imports `backplane.plugins_sdk.descriptor`, does not pull in torch at discovery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS = {
    "SDK_VERSION": "version",
    "SdkVersion": "version",
    "check_sdk_compatibility": "version",
    "AttentionBackend": "attention",
    "AttentionSpec": "attention",
    "CommonAttentionMetadata": "attention",
    "Communicator": "communicator",
    "ConfigDecision": "platform",
    "ConfigPolicy": "platform",
    "DecoderBlock": "decoder_block",
    "DeviceRuntime": "platform",
    "Fp8Weights": "quantization",
    "GraphRunner": "graph",
    "Int4Weights": "quantization",
    "LoRAMapping": "lora",
    "MOE_ACTIVATIONS": "fused_moe",
    "Platform": "platform",
    "PlatformConfigView": "config_view",
    "PlatformDescriptor": "descriptor",
    "ProbeResult": "descriptor",
    "ReferenceAttentionBackend": "reference",
    "TorchSdpaPagedAttentionBackend": "torch_sdpa",
    "add_lora_torch": "lora",
    "apply_token_bitmask": "token_bitmask",
    "deprecated": "deprecation",
    "deprecated_alias": "deprecation",
    "fused_moe_torch": "fused_moe",
    "hookimpl": "hooks",
    "hookspec": "hooks",
    "linear_fp8_reference": "quantization",
    "linear_int4_reference": "quantization",
}

__all__ = [
    "AttentionBackend",
    "AttentionSpec",
    "CommonAttentionMetadata",
    "Communicator",
    "ConfigDecision",
    "ConfigPolicy",
    "DecoderBlock",
    "DeviceRuntime",
    "Fp8Weights",
    "GraphRunner",
    "Int4Weights",
    "LoRAMapping",
    "MOE_ACTIVATIONS",
    "Platform",
    "PlatformConfigView",
    "PlatformDescriptor",
    "ProbeResult",
    "ReferenceAttentionBackend",
    "SDK_VERSION",
    "SdkVersion",
    "TorchSdpaPagedAttentionBackend",
    "add_lora_torch",
    "apply_token_bitmask",
    "check_sdk_compatibility",
    "deprecated",
    "deprecated_alias",
    "fused_moe_torch",
    "hookimpl",
    "hookspec",
    "linear_fp8_reference",
    "linear_int4_reference",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from backplane.plugins_sdk.attention import (
        AttentionBackend,
        AttentionSpec,
        CommonAttentionMetadata,
    )
    from backplane.plugins_sdk.communicator import Communicator
    from backplane.plugins_sdk.config_view import PlatformConfigView
    from backplane.plugins_sdk.decoder_block import DecoderBlock
    from backplane.plugins_sdk.deprecation import deprecated, deprecated_alias
    from backplane.plugins_sdk.descriptor import PlatformDescriptor, ProbeResult
    from backplane.plugins_sdk.fused_moe import MOE_ACTIVATIONS, fused_moe_torch
    from backplane.plugins_sdk.graph import GraphRunner
    from backplane.plugins_sdk.hooks import hookimpl, hookspec
    from backplane.plugins_sdk.lora import LoRAMapping, add_lora_torch
    from backplane.plugins_sdk.platform import (
        ConfigDecision,
        ConfigPolicy,
        DeviceRuntime,
        Platform,
    )
    from backplane.plugins_sdk.quantization import (
        Fp8Weights,
        Int4Weights,
        linear_fp8_reference,
        linear_int4_reference,
    )
    from backplane.plugins_sdk.reference import ReferenceAttentionBackend
    from backplane.plugins_sdk.token_bitmask import apply_token_bitmask
    from backplane.plugins_sdk.torch_sdpa import TorchSdpaPagedAttentionBackend
    from backplane.plugins_sdk.version import SDK_VERSION, SdkVersion, check_sdk_compatibility


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'backplane.plugins_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"backplane.plugins_sdk.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
