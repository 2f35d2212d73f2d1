"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE.

The Llama decoder (attention, norms, rotary) with the feed-forward of sparse
layers replaced by a router (``gate``, a ``[E, H]`` linear) and `FusedMoE`
experts; Qwen2-MoE adds a shared expert scaled by ``sigmoid(shared_expert_gate(x))``.

Checkpoints store every expert separately (``experts.{e}.w1/w2/w3.weight`` in
Mixtral, ``experts.{e}.gate_proj/up_proj/down_proj.weight`` in Qwen); the
loader copies them into the stacked ``w13 [E, 2I, H]`` / ``w2 [E, H, I]``
tensors the fused-MoE operation takes. Mixtral's checkpoint calls the block
``block_sparse_moe``; it is ``mlp`` here, and names are mapped both ways.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from backplane.core.layers.fused_moe import FusedMoE
from backplane.core.models.llama import DecoderDims, DecoderMLP, DecoderOptions, LlamaForCausalLM

_EXPERT_NAME = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ optional gated shared expert): ``[n, H] -> [n, H]``."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        moe_intermediate_size: int,
        top_k: int,
        renormalize: bool,
        dtype: torch.dtype,
        shared_dims: DecoderDims | None = None,
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.experts = FusedMoE(num_experts, hidden_size, moe_intermediate_size, top_k,
                                renormalize, dtype=dtype)
        self.has_shared = shared_dims is not None
        if shared_dims is not None:
            self.shared_expert = DecoderMLP(shared_dims, DecoderOptions(), dtype)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.has_shared:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoeForCausalLM(LlamaForCausalLM):
    """Shared machinery: sparse layers, per-expert checkpoint names -> stacked tensors.

    Subclasses set the checkpoint's expert projection names and implement
    `moe_block` (the block of a sparse layer) and `is_sparse_layer`.
    """

    # Checkpoint-fused projections / experts are not split over ranks yet.
    supports_tensor_parallel = False
    supports_pipeline_parallel = False

    # checkpoint projection name -> FusedMoE shard ("gate", "up", "down")
    expert_projections: ClassVar[dict[str, str]] = {}
    # the MoE block's name in the checkpoint ("mlp" here)
    checkpoint_block_name: ClassVar[str] = "mlp"

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(hf_config, dtype)
        # The Llama decoder built dense MLPs; sparse layers get the MoE block
        # instead (built on the meta device by the loader, so this costs nothing).
        for idx, layer in enumerate(self.model.layers):
            if self.is_sparse_layer(hf_config, idx):
                layer.mlp = self.moe_block(hf_config, dtype)

    def moe_block(self, hf_config: Any, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def is_sparse_layer(self, hf_config: Any, layer_idx: int) -> bool:
        return True

    # ---- checkpoint names ------------------------------------------------------------------
    def _to_internal(self, name: str) -> str:
        block = self.checkpoint_block_name
        return name if block == "mlp" else name.replace(f".{block}.", ".mlp.", 1)

    def _to_checkpoint(self, name: str) -> str:
        block = self.checkpoint_block_name
        return name if block == "mlp" else name.replace(".mlp.", f".{block}.", 1)

    def expected_weight_names(self) -> set[str]:
        names = set()
        for name in super().expected_weight_names():
            module_name, _, attr = name.rpartition(".")
            if attr in ("w13", "w2") and isinstance(self.get_submodule(module_name), FusedMoE):
                if attr == "w2":
                    continue  # both listed once, from w13
                experts = self.get_submodule(module_name).num_experts
                for e in range(experts):
                    for proj in self.expert_projections:
                        names.add(self._to_checkpoint(f"{module_name}.{e}.{proj}.weight"))
            else:
                names.add(self._to_checkpoint(name))
        return names

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        renamed = ((self._to_internal(name), tensor) for name, tensor in weights)
        return {self._to_checkpoint(name) for name in super().load_weights(renamed)}

    def _fused_target(self, name: str) -> torch.Tensor | None:
        match = _EXPERT_NAME.match(name)
        if match is not None:
            shard = self.expert_projections.get(match["proj"])
            try:
                module = self.get_submodule(match["module"])
            except AttributeError:
                module = None
            if shard is not None and isinstance(module, FusedMoE):
                expert = int(match["expert"])
                if expert >= module.num_experts:
                    return None  # reported as an unexpected tensor
                return module.expert_view(expert, shard)
        return super()._fused_target(name)


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: every layer sparse, softmax top-k renormalised, no shared expert."""

    expert_projections = {"w1": "gate", "w3": "up", "w2": "down"}
    checkpoint_block_name = "block_sparse_moe"

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return DecoderOptions()

    def moe_block(self, hf_config: Any, dtype: torch.dtype) -> nn.Module:
        return SparseMoeBlock(
            hf_config.hidden_size, hf_config.num_local_experts, hf_config.intermediate_size,
            hf_config.num_experts_per_tok, renormalize=True, dtype=dtype,
        )


class _QwenMoeForCausalLM(MoeForCausalLM):
    """Qwen MoE layout: ``mlp.gate``, ``mlp.experts.{e}.gate_proj/up_proj/down_proj``.

    ``decoder_sparse_step`` and ``mlp_only_layers`` choose the sparse layers as
    transformers does; the others keep a dense MLP of ``intermediate_size``.
    """

    expert_projections = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    shared_expert: ClassVar[bool] = False

    def is_sparse_layer(self, hf_config: Any, layer_idx: int) -> bool:
        step = getattr(hf_config, "decoder_sparse_step", 1) or 1
        only_dense = getattr(hf_config, "mlp_only_layers", None) or []
        return (layer_idx not in only_dense and hf_config.num_experts > 0
                and (layer_idx + 1) % step == 0)

    def moe_block(self, hf_config: Any, dtype: torch.dtype) -> nn.Module:
        shared = None
        if self.shared_expert:
            shared = dataclasses.replace(
                DecoderDims.from_hf_config(hf_config),
                intermediate_size=hf_config.shared_expert_intermediate_size,
            )
        return SparseMoeBlock(
            hf_config.hidden_size, hf_config.num_experts, hf_config.moe_intermediate_size,
            hf_config.num_experts_per_tok,
            renormalize=bool(getattr(hf_config, "norm_topk_prob", False)), dtype=dtype,
            shared_dims=shared,
        )


class Qwen2MoeForCausalLM(_QwenMoeForCausalLM):
    """Qwen1.5-MoE / Qwen2-MoE: q/k/v bias (``qkv_bias``), a gated shared expert."""

    shared_expert = True

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return DecoderOptions(qkv_bias=bool(getattr(hf_config, "qkv_bias", True)))


class Qwen3MoeForCausalLM(_QwenMoeForCausalLM):
    """Qwen3-MoE: per-head q/k RMSNorm like Qwen3, no shared expert."""

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
