"""How a pooling model turns hidden states into one vector per prompt.

The configuration follows sentence-transformers: ``modules.json`` lists the
modules, the ``sentence_transformers.models.Pooling`` one points at a folder
whose ``config.json`` picks the pooling mode, and a
``sentence_transformers.models.Normalize`` module means L2 normalisation.
Without modules.json the defaults are vLLM's: CLS pooling for encoders (BERT
family), last-token pooling for decoders, both normalised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

POOLING_TYPES = ("LAST", "MEAN", "CLS")
# Architectures that are encoders (bidirectional attention, no LM head).
ENCODER_ARCHITECTURES = frozenset({"BertModel", "BertForSequenceClassification"})
# Cross-encoders (sequence classification): a text pair in, relevance score(s) out.
CROSS_ENCODER_ARCHITECTURES = frozenset({"BertForSequenceClassification"})

_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
# Pooling-config keys (sentence-transformers) -> our pooling type; the others are refused.
_ST_MODES = {
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_lasttoken": "LAST",
}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolerConfig:
    """Pooling type, normalisation and matryoshka support of a model.

    Attributes:
        pooling_type: ``LAST`` (the prompt's last token), ``MEAN`` (average over
            the prompt's tokens) or ``CLS`` (the first token).
        normalize: L2-normalise embeddings (``embed``); ``encode`` never does.
        matryoshka: the model was trained so that a prefix of its embedding is an
            embedding too (``dimensions`` allowed).
        source: where the settings came from, for logs and errors.
    """

    pooling_type: str
    normalize: bool
    matryoshka: bool = False
    source: str = "defaults"


def is_encoder(hf_config: Any) -> bool:
    return any(a in ENCODER_ARCHITECTURES for a in getattr(hf_config, "architectures", None) or ())


def is_cross_encoder(hf_config: Any) -> bool:
    return any(a in CROSS_ENCODER_ARCHITECTURES
               for a in getattr(hf_config, "architectures", None) or ())


def has_sentence_transformers_config(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, "modules.json"))


def _matryoshka(hf_config: Any) -> bool:
    return bool(getattr(hf_config, "is_matryoshka", False)
                or getattr(hf_config, "matryoshka_dimensions", None))


def load_pooler_config(model_dir: str, hf_config: Any) -> PoolerConfig:
    """The pooler settings of the model in ``model_dir``; ValueError for what is unsupported."""
    matryoshka = _matryoshka(hf_config)
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        pooling_type = "CLS" if is_encoder(hf_config) else "LAST"
        return PoolerConfig(pooling_type, True, matryoshka)
    with open(modules_path, encoding="utf-8") as f:
        modules = json.load(f)
    pooling_type, normalize = None, False
    for module in modules:
        kind = module.get("type", "")
        if kind == _ST_NORMALIZE:
            normalize = True
        elif kind == _ST_POOLING:
            path = os.path.join(model_dir, module.get("path", ""), "config.json")
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            unsupported = [k for k in _ST_UNSUPPORTED if cfg.get(k)]
            chosen = [t for k, t in _ST_MODES.items() if cfg.get(k)]
            if unsupported or len(chosen) != 1:
                raise ValueError(
                    f"{path}: pooling {unsupported or chosen or 'none'} is not supported; "
                    f"exactly one of {sorted(_ST_MODES)} must be set"
                )
            pooling_type = chosen[0]
        elif kind != _ST_TRANSFORMER:
            raise ValueError(
                f"{modules_path}: sentence-transformers module {kind!r} is not supported "
                "(Transformer, Pooling and Normalize are)"
            )
    if pooling_type is None:
        pooling_type = "CLS" if is_encoder(hf_config) else "LAST"
    return PoolerConfig(pooling_type, normalize, matryoshka, source=modules_path)


def pool(hidden: torch.Tensor, cu_seqlens: list[int], pooling_type: str) -> torch.Tensor:
    """``hidden`` [tokens, d] of requests laid out flat -> [requests, d] (float32)."""
    starts = torch.tensor(cu_seqlens[:-1], device=hidden.device)
    ends = torch.tensor(cu_seqlens[1:], device=hidden.device)
    if pooling_type == "CLS":
        return hidden[starts].float()
    if pooling_type == "LAST":
        return hidden[ends - 1].float()
    lens = (ends - starts).to(torch.float32)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), ends - starts)
    sums = torch.zeros(len(lens), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seg, hidden.float())
    return sums / lens[:, None]


def finish_embedding(vector: torch.Tensor, config: PoolerConfig, task: str,
                     dimensions: int | None, normalize: bool | None) -> torch.Tensor:
    """Apply ``dimensions`` (truncate) and normalisation to one pooled vector."""
    if dimensions is not None:
        vector = vector[:dimensions]
    if task == "encode":
        return vector if not normalize else F.normalize(vector, dim=-1)
    wanted = config.normalize if normalize is None else normalize
    # Truncating a normalised matryoshka embedding needs re-normalising, as vLLM does.
    return F.normalize(vector, dim=-1) if wanted else vector


def encode_pair(tokenizer: Any, text_1: str, text_2: str, max_len: int) -> dict[str, Any]:
    """A cross-encoder prompt for a text pair: ``[CLS] a [SEP] b [SEP]`` with segment ids.

    Returns a prompt dict (``prompt_token_ids``, ``token_type_ids``) for the
    engine; ValueError when the pair is longer than ``max_len`` tokens.
    """
    enc = tokenizer(text_1, text_2, return_token_type_ids=True)
    ids = list(enc["input_ids"])
    types = list(enc.get("token_type_ids") or [0] * len(ids))
    if len(ids) > max_len:
        raise ValueError(f"the text pair has {len(ids)} tokens, more than max_model_len "
                         f"({max_len})")
    return {"prompt_token_ids": ids, "token_type_ids": types}
