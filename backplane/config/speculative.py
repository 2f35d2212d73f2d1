"""``--speculative-config``: parse vLLM's JSON keys into a checked SpeculativeConfig.

Checks here need neither the model nor a platform; those that do (the draft's
vocabulary, its directory) run in `EngineConfig.check` via `speculative_problems`.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from backplane.config.configs import (
    MAX_SPECULATIVE_TOKENS,
    SPECULATIVE_METHODS,
    SpeculativeConfig,
)

# The n-gram sizes prompt lookup tries when the config names none (longest first).
DEFAULT_PROMPT_LOOKUP = (2, 5)
# vLLM keys Backplane does not act on, each with the reason it is refused.
_REFUSED_KEYS = {
    "draft_tensor_parallel_size": "the draft runs on the target's device (tensor parallel "
                                  "is not available yet)",
    "quantization": "quantized drafts are not supported yet",
    "max_model_len": "the draft serves the target's max_model_len",
    "revision": "models are read from local directories",
    "code_revision": "models are read from local directories",
}


def parse_speculative_config(value: Any) -> SpeculativeConfig | None:
    """SpeculativeConfig from ``--speculative-config`` (a mapping or the object); None: off.

    Raises ValueError naming the key, the value and the limit.
    """
    if value is None:
        return None
    if isinstance(value, SpeculativeConfig):
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a mapping, got {value!r}")
    known = {f.name for f in fields(SpeculativeConfig)}
    for key in value:
        if key in _REFUSED_KEYS and value[key] not in (None, 1):
            raise ValueError(f"speculative_config.{key} ({value[key]!r}) is not supported: "
                             f"{_REFUSED_KEYS[key]}")
    unknown = sorted(set(value) - known - set(_REFUSED_KEYS))
    if unknown:
        raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
    config = SpeculativeConfig(**{k: v for k, v in value.items() if k in known})
    if config.method is None:
        if config.model is None:
            raise ValueError("speculative_config.method is required (one of "
                             f"{list(SPECULATIVE_METHODS)}), or give `model` for a draft model")
        config.method = "draft_model"
    if config.method not in SPECULATIVE_METHODS:
        raise ValueError(f"speculative_config.method ({config.method!r}) is not one of "
                         f"{list(SPECULATIVE_METHODS)}")
    k = config.num_speculative_tokens
    if k is None:
        raise ValueError("speculative_config.num_speculative_tokens is required (1.."
                         f"{MAX_SPECULATIVE_TOKENS})")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"speculative_config.num_speculative_tokens ({k!r}) must be an "
                         f"integer in 1..{MAX_SPECULATIVE_TOKENS}")
    if config.method == "ngram":
        if config.model is not None:
            raise ValueError(f"speculative_config.model ({config.model!r}) is not used by "
                             "method 'ngram' (drafts come from the request's own tokens)")
        _prompt_lookup(config)
    else:
        for key in ("prompt_lookup_min", "prompt_lookup_max"):
            if getattr(config, key) is not None:
                raise ValueError(f"speculative_config.{key} only applies to method 'ngram', "
                                 f"not {config.method!r}")
        if not config.model:
            raise ValueError(f"speculative_config.model is required for method "
                             f"{config.method!r} (a local model directory)")
        if not os.path.isdir(config.model):
            raise ValueError(f"speculative_config.model ({config.model!r}) is not a directory")
    batch = config.disable_by_batch_size
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"speculative_config.disable_by_batch_size ({batch!r}) must be an "
                         "integer >= 1")
    return config


def _prompt_lookup(config: SpeculativeConfig) -> None:
    """Fill and check the n-gram sizes (one given: the other defaults to it, as in vLLM)."""
    low, high = config.prompt_lookup_min, config.prompt_lookup_max
    if low is None and high is None:
        low, high = DEFAULT_PROMPT_LOOKUP
    elif low is None:
        low = min(high, DEFAULT_PROMPT_LOOKUP[0]) if isinstance(high, int) else high
    elif high is None:
        high = low
    for key, n in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"speculative_config.{key} ({n!r}) must be an integer >= 1")
    if low > high:
        raise ValueError(f"speculative_config.prompt_lookup_min ({low}) must be <= "
                         f"prompt_lookup_max ({high})")
    config.prompt_lookup_min, config.prompt_lookup_max = low, high
