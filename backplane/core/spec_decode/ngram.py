"""Prompt-lookup (n-gram) proposer: drafts copied from earlier in the same sequence.

Text often repeats itself (code, quotes, lists, extraction tasks): when the last
n tokens already appeared earlier, the tokens that followed them then are a good
guess for what follows now, and guessing costs no model call.

The search is vectorised over the batch. Occurrences are indexed by their END
column e (the last token of the candidate n-gram), which makes the match for
length n the match for length n - 1 AND one more column comparison:

    match_n[r, e] = match_{n-1}[r, e] & (ids[r, e - (n-1)] == ids[r, N_r - n])

so all lengths 1..max_n cost max_n comparisons of [R, Lmax], with no loop over
rows or tokens.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(
    token_ids: np.ndarray,
    num_tokens: np.ndarray,
    *,
    min_n: int,
    max_n: int,
    k: int,
    max_drafts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draft up to ``k`` tokens per row by matching the row's suffix earlier in the row.

    For each row, the longest n in [min_n, max_n] whose suffix (last n known
    tokens) occurs earlier, followed by at least one token, wins; a longer match
    is stronger evidence that the continuation repeats too. Among occurrences of
    that n, the MOST RECENT one followed by at least k known tokens is used:
    nearby context is the likeliest to be repeated (the current loop iteration,
    the latest quote). When none is followed by k tokens, the EARLIEST one is
    used, which has the longest continuation: in a short loop (a token repeated,
    "a b a b") the most recent copy ends right before the suffix and could only
    draft a token or two.

    Args:
        token_ids: [R, L] integer array; row r's known tokens are columns
            0..num_tokens[r]-1, anything beyond is garbage and never read.
        num_tokens: [R] number of known tokens per row (0..L).
        min_n, max_n: n-gram lengths to try, 1 <= min_n <= max_n.
        k: most drafts per row, >= 1.
        max_drafts: optional [R] per-row cap (e.g. tokens left before
            max_model_len / max_tokens); negative values count as 0.

    Returns:
        drafts: [R, k] int64, padded with -1.
        num_drafts: [R] int64, 0 for rows without a match.
    """
    _check_args(min_n, max_n, k)
    token_ids = np.asarray(token_ids)
    num_tokens = np.asarray(num_tokens, dtype=np.int64)
    _check_shapes(token_ids, num_tokens, max_drafts)

    rows = token_ids.shape[0]
    drafts = np.full((rows, k), -1, dtype=np.int64)
    num_drafts = np.zeros(rows, dtype=np.int64)
    # A match needs n >= 1 tokens, an earlier copy and one token after it: 2+ tokens.
    width = int(num_tokens.max()) if rows else 0
    if width < 2:
        return drafts, num_drafts

    ids = token_ids[:, :width]
    end = _match_end(ids, num_tokens, min_n, max_n, k)
    found = end >= 0

    # Drafts are the tokens after the occurrence, never past the known tokens.
    start = end + 1
    count = np.minimum(num_tokens - start, k)
    if max_drafts is not None:
        count = np.minimum(count, np.maximum(np.asarray(max_drafts, dtype=np.int64), 0))
    count = np.where(found, count, 0)

    offsets = np.arange(k)
    keep = offsets[None, :] < count[:, None]
    columns = np.minimum(start[:, None] + offsets[None, :], width - 1)
    gathered = np.take_along_axis(ids, columns, axis=1).astype(np.int64, copy=False)
    drafts[keep] = gathered[keep]
    num_drafts[:] = count
    return drafts, num_drafts


def _match_end(
    ids: np.ndarray, num_tokens: np.ndarray, min_n: int, max_n: int, k: int
) -> np.ndarray:
    """Per row, the end column of the chosen occurrence of the longest matching suffix
    (the latest followed by k known tokens, else the earliest).

    Returns [R] int64, -1 where no n in [min_n, max_n] matches. An occurrence
    ending at e has n tokens before it (e >= n - 1) and must end before the
    suffix's last token (e <= N - 2), so a token follows it and every compared
    column lies inside the known tokens.
    """
    rows, width = ids.shape
    row_index = np.arange(rows)
    columns = np.arange(width)
    # Last legal end column per row; -2 (nothing legal) for rows with < 2 tokens.
    last_end = num_tokens - 2

    match = np.ones((rows, width), dtype=bool)
    best_end = np.full(rows, -1, dtype=np.int64)
    for j in range(max_n):
        # The suffix's j-th token from the end; clipped for rows too short to
        # have one: those rows have no legal end for this n, so it never counts.
        tail = ids[row_index, np.maximum(num_tokens - 1 - j, 0)]
        match[:, j:] &= ids[:, : width - j] == tail[:, None]
        match[:, :j] = False  # ends before column j have no room for j + 1 tokens
        n = j + 1
        if n < min_n:
            continue
        legal = match & (columns[None, :] <= last_end[:, None])
        has = legal.any(axis=1)
        if not has.any():
            break  # a longer n-gram cannot match where this one does not
        # Ends followed by k known tokens: e + k <= N - 1.
        full = legal & (columns[None, :] <= (num_tokens - 1 - k)[:, None])
        # argmax on the reversed mask: the first True from the right is the latest end.
        latest_full = width - 1 - np.argmax(full[:, ::-1], axis=1)
        chosen = np.where(full.any(axis=1), latest_full, np.argmax(legal, axis=1))
        # Longer n runs later, so its match overrides a shorter one.
        best_end = np.where(has, chosen, best_end)
    return best_end


def _check_args(min_n: int, max_n: int, k: int) -> None:
    """Reject settings that would silently propose nothing or index out of range."""
    if min_n < 1:
        raise ValueError(f"min_n must be >= 1, got {min_n}")
    if max_n < min_n:
        raise ValueError(f"max_n must be >= min_n ({min_n}), got {max_n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _check_shapes(
    token_ids: np.ndarray, num_tokens: np.ndarray, max_drafts: np.ndarray | None
) -> None:
    """Catch layout mistakes early: a wrong num_tokens would read garbage columns."""
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be 2-D [R, L], got shape {token_ids.shape}")
    rows, length = token_ids.shape
    if num_tokens.shape != (rows,):
        raise ValueError(f"num_tokens must have shape ({rows},), got {num_tokens.shape}")
    if rows and (num_tokens.min() < 0 or num_tokens.max() > length):
        raise ValueError(
            f"num_tokens must lie in [0, {length}], got range "
            f"[{num_tokens.min()}, {num_tokens.max()}]"
        )
    if max_drafts is not None and np.shape(max_drafts) != (rows,):
        raise ValueError(f"max_drafts must have shape ({rows},), got {np.shape(max_drafts)}")
