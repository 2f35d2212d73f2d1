"""Per-step sampling inputs, gathered from the persistent batch as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingMetadata:
    """Sampling parameters of the rows being sampled this step, one entry per row.

    Optional tensors are None when no row needs that feature, so the common
    case (plain greedy or plain temperature sampling) skips the work entirely.
    """

    all_greedy: bool
    temperature: torch.Tensor  # [B] float32 (greedy rows hold 1.0, they are argmax'ed)
    greedy_mask: torch.Tensor | None  # [B] bool, None when no row is greedy
    top_k: torch.Tensor | None  # [B] int64, 0 = off
    top_p: torch.Tensor | None  # [B] float32, 1.0 = off
    min_p: torch.Tensor | None  # [B] float32, 0.0 = off
    # Penalties: token counts of outputs (frequency/presence) and a mask of
    # tokens seen in prompt or output (repetition).
    presence_penalty: torch.Tensor | None  # [B]
    frequency_penalty: torch.Tensor | None  # [B]
    repetition_penalty: torch.Tensor | None  # [B]
    output_token_counts: torch.Tensor | None  # [B, V] float32
    seen_token_mask: torch.Tensor | None  # [B, V] bool
    logit_bias: list[dict[int, float] | None] | None
    # Token ids to forbid this step, per row: EOS and stop tokens of rows that must
    # not end yet (min_tokens), and the next token of a bad word being completed.
    banned_token_ids: list[list[int]] | None
    generators: dict[int, torch.Generator]  # row -> generator of seeded requests
    max_num_logprobs: int | None  # largest `logprobs` among rows, None if no row asks
    # General-plugin logits processors: processor(logits, output_token_ids) -> logits,
    # applied after logprobs are taken and before penalties.
    logits_processors: tuple = ()
    output_token_ids: list[list[int]] | None = None
    # [B, V] bool, True where a token may be sampled (allowed_token_ids); None: all may.
    allowed_token_mask: torch.Tensor | None = None
    # Structured outputs: packed int32 token bitmask [k, ceil(V / 32)] of the k
    # constrained rows (bit set = allowed) and which rows those are; None: none is.
    grammar_bitmask: torch.Tensor | None = None
    grammar_rows: list[int] | None = None

