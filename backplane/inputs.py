"""Prompt types of the Python API (vLLM's shapes) and their one parser.

A prompt is a string, a list of token ids, or one of two dicts:

- ``TextPrompt``: ``{"prompt": "text", "cache_salt": "..."}``
- ``TokensPrompt``: ``{"prompt_token_ids": [1, 2, 3], "prompt": "optional text for display",
  "cache_salt": "..."}``

``cache_salt`` isolates the prefix cache: requests share cached KV blocks only
when their salts are equal. Multimodal inputs (``multi_modal_data``) are not
supported by any Backplane model yet and are refused; any other key is refused
too, so that a misspelt key never turns into silently different generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict


class TextPrompt(TypedDict):
    """A prompt given as text."""

    prompt: str
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    """A prompt given as token ids (``prompt`` is then only kept for display)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    cache_salt: NotRequired[str]


PromptType = str | list[int] | TextPrompt | TokensPrompt

_DICT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})
_REFUSED_KEYS = {
    "multi_modal_data": "multimodal inputs are not supported: no Backplane model takes images, "
    "audio or video yet",
    "mm_processor_kwargs": "multimodal inputs are not supported",
    "prompt_embeds": "prompt embeddings are not supported; pass text or token ids",
}


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt reduced to what the engine needs.

    Attributes:
        text: the prompt text, or None when only token ids were given.
        token_ids: the token ids, or None when they still have to be tokenized.
        cache_salt: the prefix-cache salt, or None.
    """

    text: str | None
    token_ids: list[int] | None
    cache_salt: str | None = None


def parse_prompt(prompt: Any, field: str = "prompt") -> ParsedPrompt:
    """Check one prompt's type and shape; raises TypeError/ValueError naming ``field``."""
    if isinstance(prompt, str):
        return ParsedPrompt(check_text(prompt, field), None)
    if isinstance(prompt, dict):
        return _parse_dict(prompt, field)
    if isinstance(prompt, list | tuple):
        return ParsedPrompt(None, check_token_ids(prompt, field))
    raise TypeError(
        f"{field} must be a string, a list of token ids, or a dict with 'prompt' or "
        f"'prompt_token_ids', got {type(prompt).__name__}"
    )


def check_text(text: str, field: str) -> str:
    """``text``, if it can be encoded as UTF-8 (a lone surrogate such as U+D800 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(
            f"{field} contains a lone surrogate (U+{ord(bad):04X}) at character {exc.start}, "
            "which is not valid Unicode text"
        ) from None
    return text


def check_token_ids(ids: Any, field: str) -> list[int]:
    """``ids`` as a list of non-negative ints; raises TypeError naming ``field``."""
    out = list(ids)
    for tid in out:
        if isinstance(tid, bool) or not isinstance(tid, int):
            raise TypeError(f"{field} must be a list of integer token ids, got an item {tid!r}")
        if tid < 0:
            raise ValueError(f"{field} contains token id {tid}; token ids are >= 0")
    return out


def _parse_dict(prompt: dict, field: str) -> ParsedPrompt:
    for key, why in _REFUSED_KEYS.items():
        if key in prompt:
            raise ValueError(f"{field}.{key}: {why}")
    unknown = sorted(set(prompt) - _DICT_KEYS, key=str)
    if unknown:
        raise ValueError(
            f"{field} has unknown key(s) {unknown}; a prompt dict takes 'prompt' (text), "
            "'prompt_token_ids' and 'cache_salt'"
        )
    salt = prompt.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"{field}.cache_salt must be a non-empty string, got {salt!r}")
    text = prompt.get("prompt")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"{field}.prompt must be a string, got {type(text).__name__}")
    if text is not None:
        check_text(text, f"{field}.prompt")
    if "prompt_token_ids" in prompt:
        ids = check_token_ids(prompt["prompt_token_ids"], f"{field}.prompt_token_ids")
        return ParsedPrompt(text, ids, salt)
    if text is None:
        raise ValueError(f"{field} must have a 'prompt' or a 'prompt_token_ids' key")
    return ParsedPrompt(text, None, salt)
