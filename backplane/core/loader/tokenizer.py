"""Loading a model's tokenizer through transformers' AutoTokenizer."""

from __future__ import annotations

import os

# Any one of these makes a directory loadable by AutoTokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
)


def load_tokenizer(path: str, trust_remote_code: bool = False, use_fast: bool = True):
    """The Hugging Face tokenizer stored at ``path`` (a directory or a cached hub id).

    Raises FileNotFoundError naming the directory when it holds no tokenizer
    files, and ValueError naming ``path`` when transformers cannot load them.
    """
    from transformers import AutoTokenizer

    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"no tokenizer in {path!r}: expected one of {', '.join(_TOKENIZER_FILES)}; "
            "point the tokenizer option at the directory that has them"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, use_fast=use_fast
        )
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the tokenizer from {path!r}: {exc}") from exc
    if not use_fast and getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer_mode 'slow': the tokenizer in {path!r} has no slow (Python) "
            "implementation; use tokenizer_mode 'auto'"
        )
    return tokenizer
