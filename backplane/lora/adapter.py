"""Reading PEFT LoRA adapters and mapping them onto a Backplane model's linears.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` whose tensors are named after the Hugging Face
modules they modify, e.g.::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]

and change that module's output by ``scaling * B (A x)``. Backplane fuses
q/k/v into one ``qkv_proj`` (and gate/up into ``gate_up_proj``), so an
adapter's per-projection tensors are packed here into one (A, B) pair per
Backplane module (see `LoRAWeights`), which a batched LoRA kernel can apply
with one pair of matmuls for all the parts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from backplane.core.layers.linear import MergedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"

# The unfused projection names an adapter may target.
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Module names of embeddings and output heads, which Backplane does not apply LoRA to.
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out",
                    "embed_positions", "word_embeddings")
# Prefix `PeftModel.save_pretrained` puts before the base model's module names.
_PEFT_PREFIX = "base_model.model."


class LoRAAdapterError(ValueError):
    """An adapter that cannot be loaded onto this model (the message says why)."""


@dataclass(frozen=True)
class LoRATarget:
    """A base-model linear an adapter may modify: its Backplane module name, input size, and output parts."""

    module: str                      # e.g. "model.layers.0.self_attn.qkv_proj"
    in_features: int
    parts: dict[str, int]            # shard name -> out size, in output order; {"": out} for a plain Linear
    # shard name -> the checkpoint's (and so the adapter's) module name for that shard,
    # e.g. {"q": "q_proj", ...}; empty for a plain Linear. Missing shards default to
    # f"{shard}_proj".
    part_sources: dict[str, str] = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return sum(self.parts.values())

    def part_offsets(self) -> dict[str, int]:
        """Where each part's output rows start."""
        offsets, start = {}, 0
        for name, size in self.parts.items():
            offsets[name] = start
            start += size
        return offsets


def lora_targets(model: nn.Module) -> dict[str, LoRATarget]:
    """Every q/k/v/o/gate/up/down linear of a Backplane CausalLM (fused or not), keyed by Backplane module name.

    Raises:
        ValueError: the model has no such layers (e.g. GPT-2 or BERT style models).
    """
    stacked = tuple(getattr(model, "stacked_params", ()) or ())
    sources: dict[str, dict[str, str]] = {}
    for fused_name, ckpt_name, shard in stacked:
        sources.setdefault(fused_name, {})[shard] = ckpt_name
    leaf_names = set(LORA_PROJECTIONS) | {"qkv_proj", "gate_up_proj"} | set(sources)
    targets: dict[str, LoRATarget] = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf not in leaf_names or not isinstance(module, nn.Linear):
            continue
        if isinstance(module, MergedLinear):
            parts = dict(module.output_sizes)
            shard_sources = {shard: sources.get(leaf, {}).get(shard, f"{shard}_proj")
                             for shard in parts}
        else:
            parts = {"": module.out_features}
            shard_sources = {}
        targets[name] = LoRATarget(name, module.in_features, parts, shard_sources)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no q/k/v/o/gate/up/down projection layers, so LoRA "
            f"adapters cannot be applied to it"
        )
    return targets


@dataclass
class LoRAWeights:
    """One adapter, mapped onto Backplane modules (CPU tensors).

    ``modules[name] = (A, B)`` with ``A [P*rank, in]`` and ``B [out, P*rank]``,
    P the number of parts of the target: part p uses rank rows
    ``[p*rank, (p+1)*rank)`` of A and writes only its own output rows (B is
    block-diagonal per part). Parts the adapter does not touch, and the ranks
    above a module's own rank, are zeros. The module's output changes by
    ``scaling * B @ (A @ x)``; scaling is not folded into B (except the ratio
    of a module's own scaling to ``scaling`` when ``rank_pattern`` /
    ``alpha_pattern`` give it a different one).
    """

    name: str
    rank: int
    scaling: float                    # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.modules.values())


def _is_embedding_name(module_name: str) -> bool:
    return module_name.rpartition(".")[2] in _EMBEDDING_NAMES


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching a suffix of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_adapter_config(path: str, *, max_rank: int) -> dict[str, Any]:
    """Check an adapter directory and its ``adapter_config.json`` without reading the weights.

    Cheap enough to run when a request arrives: the files exist (safetensors
    weights), and the config breaks no limit (rank, bias, DoRA, fan_in_fan_out,
    modules_to_save, embedding/lm_head targets). Whether the tensors fit the
    model is only known to `load_lora_adapter`. Returns the parsed config.

    Raises:
        LoRAAdapterError (a ValueError) naming the path, the field, the value and the limit.
    """
    path = os.fspath(path)

    def fail(msg: str) -> LoRAAdapterError:
        return LoRAAdapterError(f"LoRA adapter {path!r}: {msg}")

    if not os.path.isdir(path):
        raise fail("the adapter directory does not exist (LoRA adapters are loaded from a "
                   "local directory)")
    config_path = os.path.join(path, ADAPTER_CONFIG)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise fail(f"{ADAPTER_CONFIG} is missing")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS_BIN)):
            raise fail(f"only {ADAPTER_WEIGHTS_BIN} was found; {ADAPTER_WEIGHTS} is required "
                       f"(pickled .bin weights are not loaded; re-save the adapter with "
                       f"save_pretrained(..., safe_serialization=True))")
        raise fail(f"{ADAPTER_WEIGHTS} is missing")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise fail(f"{ADAPTER_CONFIG} cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise fail(f"{ADAPTER_CONFIG} is not a JSON object")

    _check_config(config, max_rank, fail)
    target_modules = config.get("target_modules")
    if target_modules is not None and not isinstance(target_modules, str):
        for entry in target_modules:
            if _is_embedding_name(str(entry)):
                raise fail(f"target_modules entry {str(entry)!r}: LoRA on embeddings/lm_head is "
                           f"not supported")
    return config


def load_lora_adapter(
    path: str,
    targets: dict[str, LoRATarget],
    *,
    max_rank: int,
    base_architecture: str | None = None,
    name: str | None = None,
) -> LoRAWeights:
    """Read the PEFT LoRA adapter in directory ``path`` and pack it for ``targets``.

    Args:
        path: local adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        targets: the base model's `lora_targets`.
        max_rank: the largest LoRA rank the engine was configured for.
        base_architecture: the base model's architecture, for error messages.
        name: the adapter's name; defaults to the directory name.

    Raises:
        LoRAAdapterError (a ValueError): anything that keeps the adapter from
        applying exactly as peft would, naming the path, the field or module,
        the value and the limit. Nothing is kept from a failed load.
    """
    path = os.fspath(path)
    base = base_architecture or "the base model"

    def fail(msg: str) -> LoRAAdapterError:
        return LoRAAdapterError(f"LoRA adapter {path!r}: {msg}")

    config = check_adapter_config(path, max_rank=max_rank)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    rank_cfg, alpha, rslora = _check_config(config, max_rank, fail)
    scaling = _scale(alpha, rank_cfg, rslora)
    alpha_pattern = config.get("alpha_pattern") or {}

    # adapter module name (as in the HF model) -> (target, part or None for the whole module)
    aliases: dict[str, tuple[LoRATarget, str | None]] = {}
    for target in targets.values():
        aliases[target.module] = (target, None)
        prefix = target.module.rpartition(".")[0]
        if len(target.parts) > 1 or "" not in target.parts:
            for part in target.parts:
                source = target.part_sources.get(part, f"{part}_proj")
                aliases[f"{prefix}.{source}" if prefix else source] = (target, part)
    _check_target_modules(config.get("target_modules"), aliases, base, fail)

    tensors = _read_lora_tensors(weights_path, fail)
    if not tensors:
        raise fail(f"{ADAPTER_WEIGHTS} holds no LoRA tensors (no '*.lora_A.weight' / "
                   f"'*.lora_B.weight')")

    # Check everything before building anything.
    plan: list[tuple[LoRATarget, str | None, torch.Tensor, torch.Tensor, float]] = []
    max_seen = 0
    for module_name, pair in sorted(tensors.items()):
        if _is_embedding_name(module_name):
            raise fail(f"targets {module_name!r}: LoRA on embeddings/lm_head is not supported")
        if "A" not in pair or "B" not in pair:
            missing = "lora_A" if "A" not in pair else "lora_B"
            raise fail(f"module {module_name!r} has no {missing}.weight tensor")
        hit = aliases.get(module_name)
        if hit is None:
            raise fail(f"targets module {module_name!r}, which {base} does not have as a "
                       f"LoRA-capable linear (supported: {', '.join(LORA_PROJECTIONS)})")
        target, part = hit
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise fail(f"module {module_name!r}: lora_A/lora_B must be matrices, got shapes "
                       f"{list(a.shape)} and {list(b.shape)}")
        r = a.shape[0]
        if b.shape[1] != r:
            raise fail(f"module {module_name!r}: lora_A has rank {r} but lora_B {list(b.shape)} "
                       f"has {b.shape[1]} columns")
        if r > max_rank:
            raise fail(f"module {module_name!r} has rank {r}, above max_lora_rank {max_rank}")
        if r < 1:
            raise fail(f"module {module_name!r} has rank 0")
        out = target.out_features if part is None else target.parts[part]
        if a.shape[1] != target.in_features or b.shape[0] != out:
            raise fail(
                f"module {module_name!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not "
                f"fit {base}'s {target.module} (expected [r, {target.in_features}] and "
                f"[{out}, r]); the adapter was made for a different base model"
            )
        module_alpha = float(_pattern_value(alpha_pattern, module_name, alpha))
        ratio = 1.0
        if r != rank_cfg or module_alpha != alpha:
            ratio = _scale(module_alpha, r, rslora) / scaling
        plan.append((target, part, a, b, ratio))
        max_seen = max(max_seen, r)

    rank = max_seen
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    filled: dict[str, set[str]] = {}
    for target, part, a, b, ratio in plan:
        num_parts = len(target.parts)
        if target.module not in modules:
            dtype = torch.promote_types(a.dtype, b.dtype)
            modules[target.module] = (
                torch.zeros(num_parts * rank, target.in_features, dtype=dtype),
                torch.zeros(target.out_features, num_parts * rank, dtype=dtype),
            )
            filled[target.module] = set()
        big_a, big_b = modules[target.module]
        offsets = target.part_offsets()
        parts = list(target.parts) if part is None else [part]
        r = a.shape[0]
        for p_name in parts:
            if p_name in filled[target.module]:
                raise fail(f"module {target.module!r} part {p_name!r} is modified twice "
                           f"(by a fused and an unfused LoRA)")
            filled[target.module].add(p_name)
            p = list(target.parts).index(p_name)
            start, size = offsets[p_name], target.parts[p_name]
            rows = b if part is not None else b[start:start + size]
            if ratio != 1.0:
                rows = rows * ratio
            big_a[p * rank:p * rank + r] = a
            big_b[start:start + size, p * rank:p * rank + r] = rows
    return LoRAWeights(
        name=name or os.path.basename(os.path.normpath(path)),
        rank=rank,
        scaling=scaling,
        modules=modules,
    )


def _check_config(config: dict[str, Any], max_rank: int, fail) -> tuple[int, float, bool]:
    """Refuse what Backplane cannot apply exactly; return (r, lora_alpha, use_rslora)."""
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise fail(f"peft_type {peft_type!r} is not supported (only 'LORA')")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise fail(f"r {r!r} must be a positive integer")
    if r > max_rank:
        raise fail(f"r {r} is above max_lora_rank {max_rank}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise fail(f"lora_alpha {alpha!r} must be a number")
    for key, value in (config.get("rank_pattern") or {}).items():
        if not isinstance(value, int) or value < 1:
            raise fail(f"rank_pattern[{key!r}] {value!r} must be a positive integer")
        if value > max_rank:
            raise fail(f"rank_pattern[{key!r}] {value} is above max_lora_rank {max_rank}")
    bias = config.get("bias", "none")
    if bias != "none":
        raise fail(f"bias {bias!r} is not supported (only 'none')")
    if config.get("lora_bias"):
        raise fail(f"lora_bias {config['lora_bias']!r} is not supported (only false)")
    if config.get("use_dora"):
        raise fail(f"use_dora {config['use_dora']!r}: DoRA adapters are not supported")
    if config.get("fan_in_fan_out"):
        raise fail(f"fan_in_fan_out {config['fan_in_fan_out']!r} is not supported (only false: "
                   f"it is for Conv1D layers, which Backplane's LoRA targets are not)")
    modules_to_save = config.get("modules_to_save") or []
    if modules_to_save:
        if any(_is_embedding_name(str(m)) for m in modules_to_save):
            raise fail(f"modules_to_save {modules_to_save!r}: LoRA on embeddings/lm_head is not "
                       f"supported")
        raise fail(f"modules_to_save {modules_to_save!r} is not supported (only empty: fully "
                   f"trained modules are not loaded)")
    for key in ("trainable_token_indices", "target_parameters", "layer_replication",
                "alora_invocation_tokens"):
        if config.get(key):
            raise fail(f"{key} {config[key]!r} is not supported (only empty)")
    return r, float(alpha), bool(config.get("use_rslora", False))


def _check_target_modules(target_modules, aliases, base: str, fail) -> None:
    """Refuse listed targets that are embeddings or that the model lacks."""
    if target_modules is None or isinstance(target_modules, str):
        return  # a regex (or "all-linear"): the tensors are checked instead
    for entry in target_modules:
        entry = str(entry)
        if _is_embedding_name(entry):
            raise fail(f"target_modules entry {entry!r}: LoRA on embeddings/lm_head is not "
                       f"supported")
        if not any(a == entry or a.endswith("." + entry) for a in aliases):
            raise fail(f"target_modules entry {entry!r} is not a LoRA-capable linear of {base} "
                       f"(supported: {', '.join(LORA_PROJECTIONS)})")


def _read_lora_tensors(weights_path: str, fail) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": lora_A, "B": lora_B}}`` from a PEFT safetensors file."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            for key in f.keys():
                name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
                if ".lora_magnitude_vector" in name:
                    raise fail(f"tensor {key!r}: DoRA adapters are not supported")
                if ".lora_embedding_" in name:
                    raise fail(f"tensor {key!r}: LoRA on embeddings/lm_head is not supported")
                match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.(weight|bias)", name)
                if match is None:
                    module = name.rpartition(".")[0]
                    if _is_embedding_name(module) or _is_embedding_name(name):
                        raise fail(f"tensor {key!r}: LoRA on embeddings/lm_head is not supported")
                    raise fail(f"tensor {key!r} is not a LoRA tensor (modules_to_save and other "
                               f"non-LoRA weights are not supported)")
                module, which, kind = match.groups()
                if kind == "bias":
                    raise fail(f"tensor {key!r}: LoRA biases (lora_bias) are not supported")
                out.setdefault(module, {})[which] = f.get_tensor(key)
    except SafetensorError as exc:
        raise fail(f"{ADAPTER_WEIGHTS} cannot be read: {exc}") from exc
    return out
