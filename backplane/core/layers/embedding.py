"""Token embedding and the output (logits) head, tied or not.

With ``parallel=True`` both are split over the tensor-parallel ranks by
vocabulary rows: each rank holds ``ceil(vocab / tp)`` rows (the last rank's
tail is zero padding when tp does not divide the vocabulary). The embedding
sums the ranks' lookups (each rank contributes only the ids it holds); the
head's per-rank logits are gathered by `gather_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backplane.core.distributed.parallel_state import GroupCoordinator, get_tp_group
from backplane.core.layers.parallel import Shard


def vocab_rows(vocab_size: int, parallel: bool) -> tuple[int, Shard | None]:
    """Rows this rank holds and its slice of the checkpoint (None: not split)."""
    tp = get_tp_group()
    if not parallel or tp.size == 1:
        return vocab_size, None
    per_rank = -(-vocab_size // tp.size)
    start = min(tp.rank * per_rank, vocab_size)
    return per_rank, Shard(0, start, min(per_rank, vocab_size - start))


class VocabEmbedding(nn.Embedding):
    """Token id -> hidden vector lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None,
                 parallel: bool = False):
        rows, shard = vocab_rows(vocab_size, parallel)
        super().__init__(rows, hidden_size, dtype=dtype)
        self.vocab_start = 0
        if shard is not None:
            self.checkpoint_shards = {("weight", None): shard}
            self.vocab_start = shard.start
            self.tp = get_tp_group()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if "checkpoint_shards" not in self.__dict__:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        held = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(torch.where(held, local, 0), self.weight)
        return self.tp.all_reduce(out * held.unsqueeze(-1).to(out.dtype))


def gather_logits(logits: torch.Tensor, vocab_size: int, tp: GroupCoordinator) -> torch.Tensor:
    """Every rank's vocabulary slice of ``[n, rows]`` logits, joined and trimmed of padding."""
    if tp.size == 1:
        return logits
    return tp.all_gather(logits, dim=-1)[:, :vocab_size]


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
        parallel: bool = False,
    ) -> None:
        """``parallel``: split by vocabulary rows over the tensor-parallel ranks (the
        model then joins the ranks' logits with `gather_logits`)."""
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tied_to is not None
        if tied_to is not None:
            # A plain attribute, not a submodule, so the embedding's parameter is
            # not registered twice under two names.
            self.__dict__["_tied_embedding"] = tied_to
        else:
            rows, shard = vocab_rows(vocab_size, parallel)
            self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype))
            if shard is not None:
                self.checkpoint_shards = {("weight", None): shard}

    @property
    def logits_weight(self) -> torch.Tensor:
        """The ``[vocab, hidden]`` matrix used for the projection."""
        return self._tied_embedding.weight if self.tied else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden] -> [n, vocab]`` float32 logits."""
        return F.linear(hidden, self.logits_weight).float()
