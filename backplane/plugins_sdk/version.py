"""Version of the plugin SDK contract, separate from Backplane's own version.

A plugin declares the SDK version it was written against (``sdk_version``,
``"MAJOR.MINOR"``). The rule, applied by discovery (`check_sdk_compatibility`):

- same MAJOR as `SDK_VERSION` and MINOR <= ours: accepted (minors only add members,
  so a plugin written for 1.0 runs on 1.3);
- a different MAJOR, or a newer MINOR than this Backplane provides: refused, with a
  message naming the SDK versions the plugin needs and the one installed.

History:
    1.0  descriptor/probe/load, Platform parts, AttentionBackend, Communicator, GraphRunner.
    1.1  lazy imports, ReferenceAttentionBackend, Platform.register_attention_backend,
         hookimpl/hookspec markers for general plugins, deprecation helpers;
         before its first release also Platform.prepare_model (with the core
         layers' ``layer_kind``) and AttentionBackend.allocate_kv_cache, both
         optional with defaults; TorchSdpaPagedAttentionBackend (moved from the
         cuda plugin, whose old module keeps deprecated aliases until 1.2);
         Platform.all_attention_backends / registered_attention_backends
         (registered backends no longer rewrite a subclass's
         attention_backends); Communicator at world size 1 without a process
         group; PlatformConfigView and ConfigPolicy.check_and_update(view)
         (with PlatformConfigView.for_testing and
         ConfigPolicy.default_optimization_level declared on the class;
         ConfigPolicy.default_engine_process and
         ConfigPolicy.default_async_scheduling, default None), which
         deprecates overriding ConfigPolicy.check_and_update_config(config)
         (still called in 1.1, with a DeprecationWarning; removed in 1.2);
         deprecation.deprecated_override; Platform.fused_moe (default
         fused_moe_torch, contract in plugins_sdk.fused_moe);
         AttentionSpec.logits_soft_cap (default None) with
         AttentionBackend.supports_logits_soft_cap (default False: such a
         backend is never given a soft-capped spec), implemented by
         ReferenceAttentionBackend and TorchSdpaPagedAttentionBackend; the
         runner may create one backend instance per distinct layer spec
         (CausalLM.layer_attention_specs); graph capture in the model runner:
         AttentionBackend.supports_graph_capture (default False),
         GraphRunner.capture_static / replay_static (defaults fall back to
         capture / replay) and GraphRunner.memory_bytes (default None);
         Platform.apply_token_bitmask (structured outputs; default
         token_bitmask.apply_token_bitmask); Platform.add_lora (batched
         multi-LoRA; default lora.add_lora_torch, contract and LoRAMapping
         in plugins_sdk.lora); Platform.supported_quantization (weight
         quantization methods the platform's kernels run, default ()) with
         Platform.quantization_unsupported_reason(method) (default None: why a
         method is missing here, added to the refusal); Communicator.isend
         (non-blocking send, default torch.distributed.isend; pipeline stages keep
         several batches in flight with it); the
         fp8 KV cache contract (attention.FP8_KV_CACHE_DTYPES,
         kv_cache_torch_dtype, quantize_kv_fp8; AttentionBackend.forward's
         keyword ``kv_scales``, passed only to a backend that declares an
         fp8 kv_cache_dtype); quantized checkpoints (GPTQ/AWQ 4-bit):
         Platform.make_quantized_linear (default None: the core's
         dequantizing reference) and Platform.prepare_quantized_layers (called
         by the default prepare_model), quantization.Int4Weights and
         linear_int4_reference; split models (tensor/pipeline parallel):
         Platform.init_worker (default no-op) and Platform.device_index
         (default round robin over the visible devices), an optional
         Communicator.close(), Platform.device_control_env_var and
         Platform.ray_device_resource (default None); an ``rms_norm`` layer
         replacement may declare ``accepts_residual`` (the residual add in the
         same call; default: called without it); ``"decoder_layer"`` layers with
         ``block()`` (a `decoder_block.DecoderBlock`, or None) and
         ``set_block_runner`` (a platform's one-call layer, tried first);
         the ``"decoder_stack"`` model with ``set_stack_runner`` (all its
         layers in one call, tried first);
         ``"gated_mlp"`` layers with ``set_gate_up_activation`` (a platform's
         gate/up projection and activation in one call, tried first).

Members added to a minor before its first release (as listed for 1.1) need
no new version: a plugin declaring that minor only ever meets a Backplane that
has all of them. Once a minor has shipped, the next addition opens the next one.
"""

from __future__ import annotations

import re
from typing import NamedTuple

SDK_VERSION = "1.1"

_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.\d+)?\s*$")


class SdkVersion(NamedTuple):
    """A parsed ``MAJOR.MINOR`` SDK version (a patch part, if given, is ignored)."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> SdkVersion:
        """Parse ``"1.2"`` (or ``"1.2.3"``); raises ValueError naming the bad value."""
        match = _VERSION_RE.match(str(text))
        if not match:
            raise ValueError(
                f"sdk_version {text!r} is not of the form MAJOR.MINOR (for example "
                f"{SDK_VERSION!r})"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


CURRENT = SdkVersion.parse(SDK_VERSION)


def check_sdk_compatibility(plugin_sdk_version: str, current: str = SDK_VERSION) -> str | None:
    """None when a plugin written for ``plugin_sdk_version`` runs on SDK ``current``.

    Otherwise the reason it cannot, naming the versions the plugin needs, e.g.
    ``"written for plugin SDK 2.0 (needs >=2.0,<3); this Backplane provides SDK 1.1"``.
    """
    try:
        wanted = SdkVersion.parse(plugin_sdk_version)
    except ValueError as exc:
        return str(exc)
    have = SdkVersion.parse(current)
    needs = f">={wanted},<{wanted.major + 1}"
    if wanted.major != have.major or wanted.minor > have.minor:
        hint = (
            "upgrade backplane-llm"
            if wanted > have
            else f"install a release of the plugin written for SDK {have.major}.x"
        )
        return (
            f"written for plugin SDK {wanted} (needs {needs}); this Backplane provides "
            f"SDK {have}: {hint}"
        )
    return None
