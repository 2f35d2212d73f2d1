"""BERT-family encoders (``BertModel``) for embeddings, e.g. all-MiniLM-L6-v2, and BERT
cross-encoders (``BertForSequenceClassification``, rerankers) for text-pair scores.

Bidirectional attention over each prompt, learned absolute position and
token-type embeddings, post-LayerNorm residual blocks with a GELU MLP. The
model has no LM head: it only runs under ``--runner pooling``, and its
attention layers are served by the pooling runner's dense prefill attention
with ``causal=False`` (see `backplane.core.pooling.attention`). Parameter names
are the checkpoint's, so weights load without renaming (a ``bert.`` prefix, as
in ``BertFor*`` checkpoints, is stripped).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from backplane.core.layers.attention import Attention, AttentionContext
from backplane.core.models.base import CausalLM, KVCacheShape

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, dtype=dtype)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d, dtype=dtype)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        d = config.hidden_size
        self.query = nn.Linear(d, d, dtype=dtype)
        self.key = nn.Linear(d, d, dtype=dtype)
        self.value = nn.Linear(d, d, dtype=dtype)


class _Output(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, layer_idx: int) -> None:
        super().__init__()
        heads = config.num_attention_heads
        head_size = config.hidden_size // heads
        self.self = _SelfAttention(config, dtype)
        self.output = _Output(config.hidden_size, config.hidden_size, config.layer_norm_eps,
                              dtype)
        self.attn = Attention(heads, heads, head_size, head_size**-0.5, layer_idx)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        s = self.self
        out = self.attn(s.query(x), s.key(x), s.value(x), ctx)
        return self.output(out, x)


class _Intermediate(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype)
        act = getattr(config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"BertModel: hidden_act {act!r} is not supported "
                             f"({', '.join(_ACTIVATIONS)} are)")
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, layer_idx: int) -> None:
        super().__init__()
        self.attention = _Attention(config, dtype, layer_idx)
        self.intermediate = _Intermediate(config, dtype)
        self.output = _Output(config.intermediate_size, config.hidden_size,
                              config.layer_norm_eps, dtype)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.attention(x, ctx)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, dtype, i) for i in range(config.num_hidden_layers))


class BertModel(CausalLM):
    """The BERT encoder: ``forward(input_ids, positions, ctx) -> hidden [n, d]``.

    It reuses `CausalLM`'s weight loading; it is not causal and has no logits.
    """

    is_pooling_model: ClassVar[bool] = True
    is_causal: ClassVar[bool] = False
    ignored_weight_patterns: ClassVar[tuple[str, ...]] = ("position_ids",)

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        kind = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise ValueError(f"BertModel: position_embedding_type {kind!r} is not supported "
                             "(only 'absolute')")
        self.config = hf_config
        self.embeddings = BertEmbeddings(hf_config, dtype)
        self.encoder = BertEncoder(hf_config, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, ctx)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError("BertModel is an encoder with no LM head: it cannot generate text; "
                         "serve it with --runner pooling")

    def kv_cache_shape(self) -> KVCacheShape:
        c = self.config
        heads = c.num_attention_heads
        return KVCacheShape(c.num_hidden_layers, heads, heads, c.hidden_size // heads)

    def skipped_weight_names(self) -> tuple[str, ...]:
        # BertPooler (tanh over CLS) is not part of sentence-transformers' pipeline.
        return ("pooler.dense.weight", "pooler.dense.bias")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def strip(items):
            for name, tensor in items:
                if name.startswith(("cls.", "bert.pooler.")):
                    continue  # heads of BertFor* checkpoints
                yield name.removeprefix("bert."), tensor

        return super().load_weights(strip(weights))


def _cross_encoder_activation(config: Any):
    """The activation applied to a cross-encoder's logits, as vLLM picks it.

    sentence-transformers' ``activation_fn`` (``config.sentence_transformers``) or
    ``sbert_ce_default_activation_function`` when the checkpoint names one
    (``torch.nn.modules.*``); else by ``problem_type``: regression -> identity,
    multi-label -> sigmoid, single-label -> softmax; else sigmoid for one label
    (a relevance score) and softmax for several.
    """
    name = None
    st = getattr(config, "sentence_transformers", None)
    if isinstance(st, dict) and st.get("activation_fn"):
        name = st["activation_fn"]
    elif getattr(config, "sbert_ce_default_activation_function", None):
        name = config.sbert_ce_default_activation_function
    if name is not None:
        known = {
            "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
            "torch.nn.modules.linear.Identity": lambda x: x,
            "torch.nn.modules.activation.Tanh": torch.tanh,
            "torch.nn.modules.activation.Softmax": lambda x: torch.softmax(x, dim=-1),
        }
        if name not in known:
            raise ValueError(f"cross-encoder activation {name!r} is not supported "
                             f"({', '.join(known)} are)")
        return known[name]
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return lambda x: x
    if problem == "multi_label_classification":
        return torch.sigmoid
    if problem == "single_label_classification":
        return lambda x: torch.softmax(x, dim=-1)
    if int(getattr(config, "num_labels", 1)) == 1:
        return torch.sigmoid
    return lambda x: torch.softmax(x, dim=-1)


class _BertPooler(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)


class BertForSequenceClassification(BertModel):
    """A BERT cross-encoder (reranker): ``[CLS] a [SEP] b [SEP]`` -> ``num_labels`` logits.

    The encoder is `BertModel`'s; the head is transformers': ``tanh(pooler.dense(h_CLS))``
    then ``classifier``. `classify` gives the raw logits, `activation` the
    score activation (see `_cross_encoder_activation`).
    """

    is_cross_encoder: ClassVar[bool] = True

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(hf_config, dtype)
        self.num_labels = int(getattr(hf_config, "num_labels", 1))
        self.pooler = _BertPooler(hf_config, dtype)
        self.classifier = nn.Linear(hf_config.hidden_size, self.num_labels, dtype=dtype)
        self.activation = _cross_encoder_activation(hf_config)

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """``cls_hidden`` [requests, d] (each prompt's first token) -> logits [requests, labels]."""
        return self.classifier(torch.tanh(self.pooler.dense(cls_hidden)))

    def skipped_weight_names(self) -> tuple[str, ...]:
        return ()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def strip(items):
            for name, tensor in items:
                yield name.removeprefix("bert."), tensor

        return CausalLM.load_weights(self, strip(weights))
