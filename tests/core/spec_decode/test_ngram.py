"""propose_ngram agrees with a brute-force search, and its documented choices hold."""

from __future__ import annotations

import numpy as np
import pytest

from backplane.core.spec_decode.ngram import propose_ngram


def _reference(token_ids, num_tokens, min_n, max_n, k, max_drafts=None):
    """Row by row, token by token: the definition, written for clarity not speed."""
    rows = len(num_tokens)
    drafts = np.full((rows, k), -1, dtype=np.int64)
    counts = np.zeros(rows, dtype=np.int64)
    for r in range(rows):
        seq = [int(t) for t in token_ids[r, : num_tokens[r]]]
        total = len(seq)
        for n in range(max_n, min_n - 1, -1):
            if total < n + 1:
                continue
            suffix = seq[total - n :]
            starts = [s for s in range(total - n) if seq[s : s + n] == suffix]
            if not starts:
                continue
            # The latest occurrence followed by k known tokens, else the earliest.
            full = [s for s in starts if s + n + k <= total]
            s = max(full) if full else min(starts)
            follow = seq[s + n : s + n + k]
            if max_drafts is not None:
                follow = follow[: max(int(max_drafts[r]), 0)]
            drafts[r, : len(follow)] = follow
            counts[r] = len(follow)
            break
    return drafts, counts


def _rows(*seqs, width=None, fill=-7):
    """Pack token lists into a [R, L] array padded with ``fill`` (garbage columns)."""
    width = width or max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), fill, dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
    return ids, np.array([len(s) for s in seqs], dtype=np.int64)


def test_matches_brute_force_on_random_batches():
    rng = np.random.default_rng(0)
    for trial in range(300):
        rows = int(rng.integers(1, 9))
        width = int(rng.integers(1, 40))
        vocab = int(rng.integers(2, 6))  # small vocabulary: matches are common
        ids = rng.integers(0, vocab, size=(rows, width), dtype=np.int64)
        num_tokens = rng.integers(0, width + 1, size=rows, dtype=np.int64)
        min_n = int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 4))
        k = int(rng.integers(1, 7))
        max_drafts = None
        if trial % 2:
            max_drafts = rng.integers(-1, k + 2, size=rows, dtype=np.int64)
        got = propose_ngram(ids, num_tokens, min_n=min_n, max_n=max_n, k=k,
                            max_drafts=max_drafts)
        want = _reference(ids, num_tokens, min_n, max_n, k, max_drafts)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"trial {trial}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"trial {trial}")


def test_longest_n_is_preferred_over_a_more_recent_shorter_match():
    # Suffix "1 2 3": the 3-gram occurs at 0 (followed by 7); the 1-gram "3"
    # occurs later at 5 (followed by 9). The longer match wins.
    ids, num = _rows([1, 2, 3, 7, 8, 3, 9, 1, 2, 3])
    drafts, count = propose_ngram(ids, num, min_n=1, max_n=3, k=2)
    assert count.tolist() == [2]
    assert drafts.tolist() == [[7, 8]]


def test_the_most_recent_occurrence_with_k_tokens_after_it_is_chosen():
    ids, num = _rows([5, 6, 1, 5, 6, 2, 5, 6])
    drafts, count = propose_ngram(ids, num, min_n=2, max_n=2, k=1)
    assert drafts.tolist() == [[2]] and count.tolist() == [1]
    # k = 3: the copy at 3 has only "2 5 6"... which is 3 tokens: still the latest.
    drafts, count = propose_ngram(ids, num, min_n=2, max_n=2, k=3)
    assert drafts.tolist() == [[2, 5, 6]]


def test_a_short_loop_drafts_from_its_earliest_copy():
    # "7 7 7 7 7": the latest "7 7" ends right before the suffix (one token after
    # it); the earliest has three. With k = 3 the earliest gives a full draft.
    ids, num = _rows([7, 7, 7, 7, 7])
    drafts, count = propose_ngram(ids, num, min_n=2, max_n=2, k=3)
    assert drafts.tolist() == [[7, 7, 7]] and count.tolist() == [3]


def test_drafts_stop_at_the_known_tokens_and_at_max_drafts():
    # Row 0: "4 4" ends at column 1 (overlapping the suffix is allowed), so
    # only column 2 follows it. Row 1: "1 2" occurs at 0 and 2; with k = 5 only the
    # one at 0 has five tokens after it; with k = 3 the latest (at 2) has three.
    ids, num = _rows([4, 4, 4], [1, 2, 1, 2, 3, 1, 2])
    drafts, count = propose_ngram(ids, num, min_n=2, max_n=2, k=5)
    assert count.tolist() == [1, 5]
    assert drafts.tolist() == [[4, -1, -1, -1, -1], [1, 2, 3, 1, 2]]
    drafts, count = propose_ngram(ids, num, min_n=2, max_n=2, k=3)
    assert drafts.tolist() == [[4, -1, -1], [3, 1, 2]]
    drafts, count = propose_ngram(ids, num, min_n=2, max_n=2, k=5,
                                  max_drafts=np.array([0, 2]))
    assert count.tolist() == [0, 2]
    assert drafts.tolist() == [[-1] * 5, [1, 2, -1, -1, -1]]


def test_garbage_beyond_num_tokens_is_never_read():
    # The garbage repeats the suffix and would be a longer, later match.
    ids, num = _rows([8, 9, 3, 8, 9], width=12)
    ids[0, 5:] = [8, 9, 4, 8, 9, 5, 6]
    drafts, count = propose_ngram(ids, num, min_n=1, max_n=4, k=4)
    assert count.tolist() == [3]
    assert drafts.tolist() == [[3, 8, 9, -1]]
    # Garbage alone (a row shorter than any match) proposes nothing.
    ids[0, :] = 8
    drafts, count = propose_ngram(ids, np.array([1]), min_n=1, max_n=3, k=2)
    assert count.tolist() == [0] and drafts.tolist() == [[-1, -1]]


def test_no_match_and_short_rows_propose_nothing():
    ids, num = _rows([1, 2, 3, 4], [1, 1], [5], [])
    drafts, count = propose_ngram(ids, num, min_n=1, max_n=2, k=3)
    assert count.tolist() == [0, 1, 0, 0]
    assert drafts[0].tolist() == [-1, -1, -1]
    assert drafts[1].tolist() == [1, -1, -1]
    # min_n larger than anything that repeats.
    drafts, count = propose_ngram(ids, num, min_n=2, max_n=3, k=3)
    assert count.tolist() == [0, 0, 0, 0]
    # An empty batch.
    drafts, count = propose_ngram(np.zeros((0, 4), dtype=np.int64),
                                  np.zeros(0, dtype=np.int64), min_n=1, max_n=2, k=3)
    assert drafts.shape == (0, 3) and count.shape == (0,)


def test_int32_tokens_give_int64_outputs():
    ids, num = _rows([1, 2, 1])
    drafts, count = propose_ngram(ids.astype(np.int32), num, min_n=1, max_n=1, k=2)
    assert drafts.dtype == np.int64 and count.dtype == np.int64
    assert drafts.tolist() == [[2, 1]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_n": 0, "max_n": 2, "k": 1}, "min_n must be >= 1, got 0"),
        ({"min_n": 3, "max_n": 2, "k": 1}, r"max_n must be >= min_n \(3\), got 2"),
        ({"min_n": 1, "max_n": 2, "k": 0}, "k must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    ids, num = _rows([1, 2, 1])
    with pytest.raises(ValueError, match=message):
        propose_ngram(ids, num, **kwargs)


def test_bad_shapes_are_rejected():
    ids, num = _rows([1, 2, 1])
    with pytest.raises(ValueError, match="num_tokens must lie in"):
        propose_ngram(ids, np.array([4]), min_n=1, max_n=1, k=1)
    with pytest.raises(ValueError, match="num_tokens must have shape"):
        propose_ngram(ids, np.array([1, 2]), min_n=1, max_n=1, k=1)
    with pytest.raises(ValueError, match="max_drafts must have shape"):
        propose_ngram(ids, num, min_n=1, max_n=1, k=1, max_drafts=np.array([1, 1]))
