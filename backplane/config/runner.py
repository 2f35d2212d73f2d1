"""``--runner``: whether a model is run for generation or for pooling (embeddings).

``auto`` picks ``pooling`` for embedding checkpoints: a sentence-transformers
``modules.json`` next to config.json, or an encoder architecture (BertModel,
BertForSequenceClassification);
everything else generates.
"""

from __future__ import annotations

import os
from typing import Any

RUNNER_TYPES = ("generate", "pooling")
# Architectures the pooling runner is implemented and tested for: the BERT encoder, the
# BERT cross-encoder (sequence classification: `LLM.score`, /score, /rerank) and
# the Llama-family decoders (last-token pooling over the final norm's output).
POOLING_ARCHITECTURES = frozenset({
    "BertModel", "BertForSequenceClassification", "LlamaForCausalLM", "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
})


def resolve_runner(runner: str, model_dir: str, hf_config: Any) -> str:
    """``"generate"`` or ``"pooling"`` for ``runner`` (``auto`` detected from the checkpoint)."""
    from backplane.core.pooling.pooler import has_sentence_transformers_config, is_encoder

    if runner in RUNNER_TYPES:
        return runner
    if runner != "auto":
        raise ValueError(f"runner ({runner!r}) must be one of auto, generate, pooling")
    if is_encoder(hf_config) or (
        os.path.isdir(model_dir) and has_sentence_transformers_config(model_dir)
    ):
        return "pooling"
    return "generate"


def runner_problems(runner: str, model_dir: str, hf_config: Any) -> list[str]:
    """Why the model cannot run as ``runner`` (empty when it can)."""
    from backplane.core.pooling.pooler import is_encoder

    try:
        kind = resolve_runner(runner, model_dir, hf_config)
    except ValueError as exc:
        return [str(exc)]
    arch = ", ".join(getattr(hf_config, "architectures", None) or ())
    if kind == "pooling" and not POOLING_ARCHITECTURES & set(
        getattr(hf_config, "architectures", None) or ()
    ):
        return [f"runner 'pooling': {arch or 'this model'} cannot run as a pooling model; "
                f"pooling is implemented for {', '.join(sorted(POOLING_ARCHITECTURES))}"]
    if kind == "generate" and is_encoder(hf_config):
        return [f"runner 'generate': {arch} is an encoder with no LM head and cannot generate "
                "text; use --runner pooling (or auto)"]
    return []
