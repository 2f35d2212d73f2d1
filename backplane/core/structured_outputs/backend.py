"""The backend interface: a `GrammarBackend` compiles a constraint once; a `Grammar` is one
request's matcher over that compiled form (state advances with each accepted token)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from backplane.core.structured_outputs.errors import (
    InvalidSpecError,
    StructuredOutputError,
    UnsupportedSpecError,
)
from backplane.core.structured_outputs.params import StructuredOutputsParams

__all__ = [
    "Grammar", "GrammarBackend", "InvalidSpecError", "StructuredOutputError",
    "UnsupportedSpecError", "bitmask_width", "eos_ids_of",
]


def bitmask_width(vocab_size: int) -> int:
    """Number of int32 words per bitmask row (bit ``i % 32`` of word ``i // 32`` = token i)."""
    return (vocab_size + 31) // 32


def eos_ids_of(tokenizer: Any, eos_token_ids: Sequence[int] | None) -> list[int]:
    """The stop tokens a grammar may end with: the explicit list, else the tokenizer's EOS."""
    if eos_token_ids:
        return sorted({int(i) for i in eos_token_ids})
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_token_ids explicitly")
    return [int(eos)]


class Grammar(ABC):
    """One request's grammar state.

    Not thread-safe: the engine drives a request's grammar from one thread at a time.
    ``compiled`` is the backend's shared compiled form this matcher was built from.
    """

    backend_name: str = ""

    def __init__(self, compiled: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.num_processed_tokens = 0

    @abstractmethod
    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance over ``token_ids`` (all or nothing): True if the grammar accepts them all
        in order; on False the state is unchanged (where rollback is supported)."""

    @abstractmethod
    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of ``token_ids`` the grammar would accept; no state change."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of a CPU int32 bitmask of shape
        ``(rows, bitmask_width(vocab_size))``; bit set = allowed. EOS is allowed only where
        the grammar may end; ids past the tokenizer's vocabulary are never allowed."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar has accepted a stop (EOS) token."""

    @property
    def supports_rollback(self) -> bool:
        return True

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (speculative decoding)."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the initial state (preemption with recompute)."""


class GrammarBackend(ABC):
    """Compiles constraints for one tokenizer and model vocabulary size.

    ``compile_spec`` is the expensive part (run off the engine thread, cached by the
    manager); ``new_grammar`` is cheap and builds a fresh matcher per request.
    Implementations must be safe to call ``compile_spec`` from several threads.
    """

    name: str = ""

    def __init__(self, tokenizer: Any, vocab_size: int,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        tok_len = len(tokenizer)
        if vocab_size < tok_len:
            raise ValueError(
                f"vocab_size {vocab_size} is smaller than the tokenizer's {tok_len} tokens")
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = eos_ids_of(tokenizer, eos_token_ids)

    @abstractmethod
    def validate(self, params: StructuredOutputsParams) -> None:
        """Cheap check (no mask tables): raise InvalidSpecError / UnsupportedSpecError."""

    @abstractmethod
    def compile_spec(self, params: StructuredOutputsParams) -> Any:
        """Compile to the backend's shareable form; raises like `validate`."""

    @abstractmethod
    def new_grammar(self, compiled: Any) -> Grammar:
        """A fresh per-request matcher over a compiled form from `compile_spec`."""

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """``new_grammar(compile_spec(params))`` (uncached; the manager caches)."""
        return self.new_grammar(self.compile_spec(params))
