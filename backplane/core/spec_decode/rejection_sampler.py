"""Exact verification of draft tokens: the speculative-sampling rule.

The target model scored every draft position of a request in one pass. Draft j
(token d, proposed with probability q_j(d)) is kept with probability
min(1, p_j(d) / q_j(d)); at the first rejection a replacement is drawn from the
residual normalize(max(p_j - q_j, 0)); if every draft survives, a bonus token is
drawn from the position after the last draft. Each emitted token is then
distributed exactly as the target alone would have sampled it (Leviathan et
al. 2023, Chen et al. 2023), so speculation only changes speed, never output
distribution. Greedy requests keep a draft iff it is the target's argmax, which
reproduces greedy decoding token for token.

Layout: request b owns target rows ``cu[b] : cu[b] + n_b + 1`` (one per draft
plus the bonus position) and draft rows ``draft_cu[b] : draft_cu[b] + n_b``.
Everything is padded to [B, K + 1] with index gathers and decided for all
requests at once; only seeded requests touch Python per request, because each
of their positions draws from its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backplane.core.sampling.sampler import sample_inverse_cdf


@dataclass
class RejectionOutput:
    """Tokens emitted for each request in this step.

    Attributes:
        token_ids: [B, K + 1] int64: the accepted drafts, then the recovered
            (at the first rejection) or bonus token, padded with -1.
        num_accepted: [B] int64 drafts accepted (0..n_b); row b holds
            num_accepted[b] + 1 tokens.
    """

    token_ids: torch.Tensor
    num_accepted: torch.Tensor


def rejection_sample(
    target_probs: torch.Tensor,
    target_argmax: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: torch.Tensor,
    generators: dict[int, list[torch.Generator]] | None = None,
) -> RejectionOutput:
    """Accept the longest draft prefix the target agrees with, then emit one more token.

    Args:
        target_probs: [sum(n_b + 1), V] float32 target distributions after the
            sampling parameters (temperature, top-k/p, ...). Rows of greedy
            requests are never read for decisions and may hold anything.
        target_argmax: [sum(n_b + 1)] int64 argmax of the processed logits,
            used for greedy requests.
        draft_token_ids: [sum(n_b)] int64 proposed tokens.
        num_drafts: [B] int64 n_b per request (0 allowed), on the same device.
        draft_probs: [sum(n_b), V] float32 draft distributions q, or None when
            the drafts are deterministic proposals (n-gram): q is then a point
            mass on the draft token.
        greedy: [B] bool.
        generators: request index -> n_b + 1 generators, one per target
            position; a seeded request draws all randomness at position j
            (acceptance uniform and recovered/bonus noise) from
            ``generators[b][j]``, so its tokens do not depend on the batch.

    Returns:
        RejectionOutput with [B, K + 1] tokens and [B] accepted counts.
    """
    batch = num_drafts.shape[0]
    max_drafts = _check_layout(target_probs, target_argmax, draft_token_ids, num_drafts,
                               draft_probs, greedy)
    device = target_probs.device
    num_drafts = num_drafts.long()
    if batch == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return RejectionOutput(token_ids=empty.view(0, 1), num_accepted=empty)
    seeded = _seeded_requests(generators, greedy, num_drafts)

    # Where each request's rows start in the flattened target and draft tensors.
    target_start = torch.cumsum(num_drafts + 1, 0) - (num_drafts + 1)
    draft_start = torch.cumsum(num_drafts, 0) - num_drafts
    position = torch.arange(max_drafts + 1, device=device)[None, :]
    has_draft = position[:, :max_drafts] < num_drafts[:, None]  # [B, K]

    # Padded [B, K] views of the drafts and of the target rows that judge them;
    # padding points at row 0, a real row, and is masked out below.
    target_rows = torch.where(position <= num_drafts[:, None],
                              target_start[:, None] + position, 0)  # [B, K + 1]
    draft_rows = torch.where(has_draft, draft_start[:, None] + position[:, :max_drafts], 0)
    drafts = torch.where(has_draft, draft_token_ids[draft_rows], -1)
    safe_drafts = drafts.clamp(min=0)

    greedy_ok = drafts == target_argmax[target_rows[:, :max_drafts]]
    random_ok = _random_accept(target_probs, draft_probs, target_rows[:, :max_drafts],
                               draft_rows, safe_drafts, seeded)
    accepted = torch.where(greedy[:, None], greedy_ok, random_ok) & has_draft
    # The accepted prefix ends at the first rejection: a running product of the mask.
    num_accepted = torch.cumprod(accepted.long(), dim=1).sum(dim=1)

    # The one token after the prefix: from the first rejected position, or the bonus one.
    final_row = target_start + num_accepted
    final = target_argmax[final_row].long()
    if not bool(greedy.all()):
        rejected = num_accepted < num_drafts
        drawn = _draw_final(target_probs, draft_probs, draft_token_ids, final_row,
                            draft_start + num_accepted, rejected, seeded, num_accepted)
        final = torch.where(greedy, final, drawn)

    token_ids = torch.full((batch, max_drafts + 1), -1, dtype=torch.long, device=device)
    token_ids[:, :max_drafts] = torch.where(position[:, :max_drafts] < num_accepted[:, None],
                                            drafts, -1)
    token_ids.scatter_(1, num_accepted[:, None], final[:, None])
    return RejectionOutput(token_ids=token_ids, num_accepted=num_accepted)


def _random_accept(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_rows: torch.Tensor,
    draft_rows: torch.Tensor,
    safe_drafts: torch.Tensor,
    seeded: dict[int, list[torch.Generator]],
) -> torch.Tensor:
    """[B, K] acceptance of each draft under min(1, p/q), for every request at once.

    Accept iff u * q <= p with u ~ U[0, 1): probability min(1, p / q). p = 0
    never accepts (the target cannot emit the token). q = 0 cannot happen for a
    token the draft sampled, but if it does the ratio is infinite, so it
    accepts exactly when p > 0; nothing divides, so nothing can be NaN.
    """
    batch, width = target_rows.shape
    p = target_probs[target_rows, safe_drafts]  # [B, K] gathers, no [B, K, V] copy
    q = torch.ones_like(p) if draft_probs is None else draft_probs[draft_rows, safe_drafts]
    uniform = torch.rand(batch, width, device=p.device, dtype=p.dtype)
    for b, gens in seeded.items():
        # One draw per draft position from that position's own generator. Only
        # the first n_b columns are drawn; the rest are padding.
        for j in range(len(gens) - 1):
            uniform[b, j] = torch.rand((), generator=gens[j], device=p.device, dtype=p.dtype)
    return (p > 0) & (uniform * q <= p)


def _draw_final(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_token_ids: torch.Tensor,
    final_row: torch.Tensor,
    final_draft_row: torch.Tensor,
    rejected: torch.Tensor,
    seeded: dict[int, list[torch.Generator]],
    num_accepted: torch.Tensor,
) -> torch.Tensor:
    """[B] recovered tokens (residual at the first rejection) or bonus tokens (p).

    One [B, V] tensor for the whole batch. The residual need not be normalised:
    inverse-CDF sampling draws proportionally to any non-negative weights w.
    """
    p = target_probs[final_row]  # [B, V]
    weights = p
    if draft_token_ids.numel():
        draft_row = torch.where(rejected, final_draft_row, 0)
        if draft_probs is None:
            # Point-mass q: max(p - q, 0) is p without the rejected token.
            residual = p.scatter(1, draft_token_ids[draft_row][:, None], 0.0)
        else:
            residual = (p - draft_probs[draft_row]).clamp_(min=0)
        # An all-zero residual (ties, rounding, q >= p everywhere) has nothing to draw
        # from; fall back to p, which is what the residual approximates.
        residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p)
        weights = torch.where(rejected[:, None], residual, p)

    generators = {}
    if seeded:
        positions = num_accepted[list(seeded)].tolist()
        generators = {b: gens[j] for (b, gens), j in zip(seeded.items(), positions, strict=True)}
    return sample_inverse_cdf(weights, generators)


def _check_layout(
    target_probs: torch.Tensor,
    target_argmax: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: torch.Tensor,
) -> int:
    """Check the flattened layout agrees with num_drafts; return K = max(n_b).

    A mismatch would silently pair drafts with the wrong target rows, so it is
    worth the one host sync, which K (an output shape) needs anyway.
    """
    batch = num_drafts.shape[0]
    if num_drafts.ndim != 1 or greedy.shape != (batch,):
        raise ValueError(f"num_drafts and greedy must both be [B], got "
                         f"{tuple(num_drafts.shape)} and {tuple(greedy.shape)}")
    if batch == 0:
        return 0
    lowest, highest, total = torch.stack(
        [num_drafts.min(), num_drafts.max(), num_drafts.sum()]).tolist()
    if lowest < 0:
        raise ValueError(f"num_drafts must be >= 0, got {lowest}")
    rows = total + batch
    if target_probs.ndim != 2 or target_probs.shape[0] != rows:
        raise ValueError(f"target_probs must be [sum(n_b + 1) = {rows}, V], "
                         f"got {tuple(target_probs.shape)}")
    if target_argmax.shape != (rows,):
        raise ValueError(f"target_argmax must be [{rows}], got {tuple(target_argmax.shape)}")
    if draft_token_ids.shape != (total,):
        raise ValueError(f"draft_token_ids must be [sum(n_b) = {total}], "
                         f"got {tuple(draft_token_ids.shape)}")
    if draft_probs is not None and draft_probs.shape != (total, target_probs.shape[1]):
        raise ValueError(f"draft_probs must be [{total}, {target_probs.shape[1]}], "
                         f"got {tuple(draft_probs.shape)}")
    return int(highest)


def _seeded_requests(
    generators: dict[int, list[torch.Generator]] | None,
    greedy: torch.Tensor,
    num_drafts: torch.Tensor,
) -> dict[int, list[torch.Generator]]:
    """The random requests that bring generators, checked: one per target position.

    Greedy requests draw nothing, so their generators are ignored.
    """
    if not generators:
        return {}
    index = list(generators)
    is_greedy = greedy[index].tolist()
    counts = num_drafts[index].tolist()
    seeded = {}
    for b, skip, count in zip(index, is_greedy, counts, strict=True):
        gens = generators[b]
        if len(gens) != count + 1:
            raise ValueError(f"generators[{b}] must hold n_b + 1 = {count + 1} generators, "
                             f"got {len(gens)}")
        if not skip:
            seeded[b] = gens
    return seeded
