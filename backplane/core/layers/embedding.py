"""Token embedding and the output (logits) head, tied or not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Embedding):
    """Token id -> hidden vector lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__(vocab_size, hidden_size, dtype=dtype)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits.

    With ``tied_to`` the head reuses the embedding matrix (no own parameter, and
    none is expected in the checkpoint); otherwise it owns ``weight``.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype | None = None,
        tied_to: VocabEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tied_to is not None
        if tied_to is not None:
            # A plain attribute, not a submodule, so the embedding's parameter is
            # not registered twice under two names.
            self.__dict__["_tied_embedding"] = tied_to
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype))

    @property
    def logits_weight(self) -> torch.Tensor:
        """The ``[vocab, hidden]`` matrix used for the projection."""
        return self._tied_embedding.weight if self.tied else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden] -> [n, vocab]`` float32 logits."""
        return F.linear(hidden, self.logits_weight).float()
