"""Model registry: Hugging Face ``architectures`` names -> Backplane model classes.

Built-in models are registered as ``"module:Class"`` strings and imported on
first use, so importing the registry stays cheap. General plugins add their own
architectures with `register_model` (a class or such a string).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

_BUILTIN_MODELS: dict[str, str] = {
    "Gemma2ForCausalLM": "backplane.core.models.gemma:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "backplane.core.models.gemma:Gemma3ForCausalLM",
    "LlamaForCausalLM": "backplane.core.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "backplane.core.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "backplane.core.models.qwen:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "backplane.core.models.qwen:Qwen3ForCausalLM",
    # Encoder (pooling only: --runner pooling), see backplane.core.pooling.
    "BertModel": "backplane.core.models.bert:BertModel",
    "BertForSequenceClassification": "backplane.core.models.bert:BertForSequenceClassification",
    "GPT2LMHeadModel": "backplane.core.models.gpt2:GPT2LMHeadModel",
    "OPTForCausalLM": "backplane.core.models.opt:OPTForCausalLM",
    "GraniteForCausalLM": "backplane.core.models.granite:GraniteForCausalLM",
    "Olmo2ForCausalLM": "backplane.core.models.olmo2:Olmo2ForCausalLM",
    "Phi3ForCausalLM": "backplane.core.models.phi3:Phi3ForCausalLM",
    "MixtralForCausalLM": "backplane.core.models.moe:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "backplane.core.models.moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "backplane.core.models.moe:Qwen3MoeForCausalLM",
}

_models: dict[str, type[nn.Module] | str] = dict(_BUILTIN_MODELS)


def register_model(architecture: str, model_cls: type[nn.Module] | str) -> None:
    """Make ``architecture`` (as in config.json ``architectures``) load with ``model_cls``.

    ``model_cls`` is a class built as ``cls(hf_config, dtype)`` or a lazy
    ``"package.module:ClassName"`` string. Registering an existing name replaces
    it (logged), which lets a plugin override a built-in implementation.
    """
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f"architecture must be a non-empty string, got {architecture!r}")
    if isinstance(model_cls, str):
        if ":" not in model_cls:
            raise ValueError(
                f"lazy model class {model_cls!r} must look like 'package.module:ClassName'"
            )
    elif not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
        raise TypeError(f"model class for {architecture!r} must be an nn.Module subclass, "
                        f"got {model_cls!r}")
    if architecture in _models:
        logger.info("model architecture %s re-registered with %s", architecture, model_cls)
    _models[architecture] = model_cls


def supported_architectures() -> list[str]:
    """Every registered architecture name, sorted."""
    return sorted(_models)


def _load(architecture: str) -> type[nn.Module]:
    entry = _models[architecture]
    if isinstance(entry, str):
        module_name, _, class_name = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ImportError(
                f"model class {entry!r} registered for {architecture!r} cannot be imported: {exc}"
            ) from exc
        _models[architecture] = entry
    return entry


def resolve_model_class(hf_config: Any) -> type[nn.Module]:
    """The model class for a transformers config (first registered name in ``architectures``).

    Raises ValueError naming the config's architectures and the supported ones
    when none is registered.
    """
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for name in architectures:
        if name in _models:
            return _load(name)
    model_type = getattr(hf_config, "model_type", None)
    raise ValueError(
        f"model architecture(s) {architectures or '(none listed in config.json)'} "
        f"(model_type {model_type!r}) are not supported; supported architectures: "
        f"{', '.join(supported_architectures())}"
    )
