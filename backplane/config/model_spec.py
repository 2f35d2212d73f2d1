"""ModelSpec: the model's geometry and defaults, computed once from its HF config.

Everything that needs the number of layers, heads, the head size, the
vocabulary, the sliding window, the rope settings or the EOS ids reads them
here instead of re-deriving them from ``hf_config`` (which is how a halved
head count once reached the attention spec but not the model or the cache).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from backplane.config.attention_spec import attention_spec_from_config
from backplane.plugins_sdk.attention import kv_cache_torch_dtype

if TYPE_CHECKING:
    from backplane.config.engine import EngineConfig
    from backplane.plugins_sdk import AttentionSpec

# generation_config.json keys that are sampling defaults (vLLM applies the same ones).
GENERATION_DEFAULT_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens",
)
# --generation-config values besides a directory: the model's file, or none at all.
GENERATION_CONFIG_MODES = ("auto", "vllm")


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about the model, per tensor-parallel rank where it matters.

    Attributes:
        architecture: the HF ``architectures[0]`` (the registry key).
        dtype: the resolved weight/activation dtype.
        vocab_size, num_layers: from the HF config.
        num_heads, num_kv_heads: whole-model head counts.
        num_heads_per_rank, num_kv_heads_per_rank: what one tensor-parallel rank holds.
        head_size: per-head dimension.
        sliding_window: the attention window, or None for full attention.
        max_position_embeddings: the model's context limit, if it states one.
        rope: the rope parameters (theta and scaling) as the HF config gives them.
        eos_token_ids: end-of-sequence ids from config.json and generation_config.json
            (the engine adds the tokenizer's).
        generation_defaults: sampling defaults under their generation_config.json
            names, from the file ``--generation-config`` selects, with
            ``--override-generation-config`` merged over them (`sampling_defaults`
            gives them under SamplingParams' names).
        block_size: tokens per KV block.
        kv_cache_dtype: the dtype of the KV cache tensors (an fp8 dtype for the
            ``fp8*`` names: one byte per element, so a block takes half bf16's bytes).
        tie_word_embeddings: the LM head shares the embedding weights.
        logits_soft_cap: attention logit soft-cap (Gemma 2), None without one.
        attention: the per-rank AttentionSpec (the same one backend selection used).
    """

    architecture: str
    dtype: torch.dtype
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_heads_per_rank: int
    num_kv_heads_per_rank: int
    head_size: int
    sliding_window: int | None
    max_position_embeddings: int | None
    rope: MappingProxyType = field(repr=False)
    eos_token_ids: frozenset[int]
    generation_defaults: MappingProxyType = field(repr=False)
    block_size: int
    kv_cache_dtype: torch.dtype
    tie_word_embeddings: bool
    logits_soft_cap: float | None = None
    attention: AttentionSpec | None = field(default=None, repr=False)

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes one KV block takes over all layers of one rank (keys and values)."""
        itemsize = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        per_layer = 2 * self.block_size * self.num_kv_heads_per_rank * self.head_size
        return self.num_layers * per_layer * itemsize

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """`generation_defaults` under SamplingParams' names (max_new_tokens -> max_tokens)."""
        return sampling_defaults(self.generation_defaults)

    @classmethod
    def from_config(cls, config: EngineConfig) -> ModelSpec:
        """The spec of a finalized config's model (reads generation_config.json if present)."""
        from backplane.core.layers.rotary import rope_parameters

        mc, cc = config.model_config, config.cache_config
        hf = mc.hf_config
        # The per-rank geometry is the AttentionSpec backend selection already used,
        # so the cache, the backend and the model cannot disagree on it.
        attention = attention_spec_from_config(config)
        heads = int(hf.num_attention_heads)
        kv_heads = int(getattr(hf, "num_key_value_heads", None) or heads)
        architectures = getattr(hf, "architectures", None) or [type(hf).__name__]
        eos, _ = _generation_config(mc.model)
        defaults = generation_defaults(
            mc.model, mc.generation_config, mc.override_generation_config
        )
        eos |= _ids(getattr(hf, "eos_token_id", None))
        max_positions = getattr(hf, "max_position_embeddings", None)
        return cls(
            architecture=str(architectures[0]),
            dtype=mc.torch_dtype,
            vocab_size=int(hf.vocab_size),
            num_layers=int(hf.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv_heads,
            num_heads_per_rank=attention.num_heads,
            num_kv_heads_per_rank=attention.num_kv_heads,
            head_size=attention.head_size,
            sliding_window=attention.sliding_window,
            max_position_embeddings=int(max_positions) if max_positions else None,
            rope=MappingProxyType(rope_parameters(hf)),
            eos_token_ids=frozenset(eos),
            generation_defaults=MappingProxyType(defaults),
            block_size=cc.block_size,
            kv_cache_dtype=kv_cache_torch_dtype(cc.kv_cache_dtype, mc.torch_dtype),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            logits_soft_cap=attention.logits_soft_cap,
            attention=attention,
        )

    def attention_spec(self) -> AttentionSpec:
        """The per-rank AttentionSpec the platform's backends are asked about."""
        return self.attention


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def _generation_config(model_dir: str) -> tuple[set[int], dict[str, Any]]:
    """(EOS ids, sampling defaults) of the model's generation_config.json, if any."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return set(), {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    defaults = {k: data[k] for k in GENERATION_DEFAULT_KEYS if data.get(k) is not None}
    return _ids(data.get("eos_token_id")), defaults


def sampling_defaults(defaults: Any) -> dict[str, Any]:
    """Generation defaults under SamplingParams' names (vLLM's ``get_diff_sampling_param``)."""
    out = dict(defaults)
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out


def generation_defaults(
    model_dir: str, source: str = "auto", override: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The sampling defaults in force (generation_config.json names).

    ``source``: ``"auto"`` reads ``model_dir``'s generation_config.json,
    ``"vllm"`` reads nothing, anything else is a directory whose
    generation_config.json is read. ``override`` is merged over the result (a
    None value drops that default).
    """
    if source == "vllm":
        defaults: dict[str, Any] = {}
    else:
        _, defaults = _generation_config(model_dir if source == "auto" else source)
    for key, value in (override or {}).items():
        if value is None:
            defaults.pop(key, None)
        else:
            defaults[key] = value
    return defaults


def generation_config_problems(source: Any, override: Any) -> list[str]:
    """Problems of ``--generation-config`` / ``--override-generation-config`` (no model needed)."""
    out = []
    if not isinstance(source, str) or not source:
        out.append(
            f"generation_config ({source!r}) must be 'auto', 'vllm' or a directory holding a "
            "generation_config.json"
        )
    elif source not in GENERATION_CONFIG_MODES:
        if not os.path.isdir(source):
            out.append(
                f"generation_config ({source!r}) is neither 'auto', 'vllm' nor a directory"
            )
        elif not os.path.isfile(os.path.join(source, "generation_config.json")):
            out.append(
                f"generation_config ({source!r}): the directory has no generation_config.json; "
                "pass a directory that has one, or 'auto' / 'vllm'"
            )
    if override is None:
        return out
    if not isinstance(override, dict):
        return out + [
            f"override_generation_config must be a JSON object, got {type(override).__name__}"
        ]
    unknown = sorted(set(override) - set(GENERATION_DEFAULT_KEYS))
    if unknown:
        out.append(
            f"override_generation_config: unknown key(s) {unknown}; known: "
            f"{list(GENERATION_DEFAULT_KEYS)}"
        )
    else:
        out += sampling_defaults_problems(
            {k: v for k, v in override.items() if v is not None}, "override_generation_config"
        )
    return out


def sampling_defaults_problems(defaults: dict[str, Any], origin: str) -> list[str]:
    """Why ``defaults`` (generation_config.json names) would make every request invalid."""
    from backplane.sampling_params import SamplingParams

    try:
        SamplingParams(**sampling_defaults(defaults))
    except (TypeError, ValueError) as exc:
        return [f"{origin}: {str(exc).replace('max_tokens', 'max_new_tokens')}"]
    return []
