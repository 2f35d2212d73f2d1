"""rejection_sample: greedy equals plain greedy decoding, sampling is exactly the target's."""

from __future__ import annotations

import pytest
import torch

from backplane.core.spec_decode.rejection_sampler import rejection_sample

# Chi-square critical values at significance 0.001, by degrees of freedom
# (scipy.stats.chi2.isf(0.001, df)); precomputed so the tests need no scipy.
_CHI2_CRITICAL_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458,
                       7: 24.322}


def _layout(num_drafts: list[int]):
    """Flattened row ranges: target rows per request, draft rows per request."""
    target, draft, t, d = [], [], 0, 0
    for n in num_drafts:
        target.append(range(t, t + n + 1))
        draft.append(range(d, d + n))
        t, d = t + n + 1, d + n
    return target, draft


def _greedy_reference(argmax: torch.Tensor, drafts: torch.Tensor, num_drafts: list[int]):
    """Plain greedy decoding, one token at a time: keep drafts while they are the argmax."""
    target, draft = _layout(num_drafts)
    out = []
    for rows, drows in zip(target, draft, strict=True):
        tokens = []
        for j, dr in enumerate(drows):
            if int(drafts[dr]) != int(argmax[rows[j]]):
                break
            tokens.append(int(drafts[dr]))
        tokens.append(int(argmax[rows[len(tokens)]]))
        out.append(tokens)
    return out


def _rows(out, b):
    """Request b's emitted tokens (num_accepted + 1 of them); checks the -1 padding."""
    count = int(out.num_accepted[b]) + 1
    row = out.token_ids[b].tolist()
    assert all(t == -1 for t in row[count:])
    return row[:count]


def _random_case(num_drafts: list[int], vocab: int, seed: int, match: float = 0.7):
    """Random logits and drafts that copy the argmax with probability ``match``."""
    gen = torch.Generator().manual_seed(seed)
    rows = sum(num_drafts) + len(num_drafts)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    argmax = logits.argmax(dim=-1)
    _, draft = _layout(num_drafts)
    target, _ = _layout(num_drafts)
    drafts = torch.randint(0, vocab, (sum(num_drafts),), generator=gen)
    for trows, drows in zip(target, draft, strict=True):
        for j, dr in enumerate(drows):
            if torch.rand((), generator=gen) < match:
                drafts[dr] = argmax[trows[j]]
    return logits, argmax, drafts


def test_greedy_equals_greedy_decoding():
    num_drafts = [3, 0, 4, 1, 2, 4, 0, 3, 4, 4]
    logits, argmax, drafts = _random_case(num_drafts, vocab=50, seed=1)
    # Greedy rows' probabilities are never read: garbage must not matter.
    probs = torch.full_like(logits, float("nan"))
    out = rejection_sample(probs, argmax, drafts, torch.tensor(num_drafts), None,
                           torch.ones(len(num_drafts), dtype=torch.bool))
    want = _greedy_reference(argmax, drafts, num_drafts)
    assert [_rows(out, b) for b in range(len(num_drafts))] == want
    assert out.token_ids.shape == (len(num_drafts), 5)
    assert out.num_accepted.tolist() == [len(w) - 1 for w in want]


def test_greedy_all_accepted_emits_the_bonus_token():
    num_drafts = [2, 3]
    logits, argmax, drafts = _random_case(num_drafts, vocab=20, seed=2, match=1.0)
    out = rejection_sample(logits.softmax(-1), argmax, drafts, torch.tensor(num_drafts), None,
                           torch.ones(2, dtype=torch.bool))
    assert out.num_accepted.tolist() == [2, 3]
    assert _rows(out, 0) == drafts[:2].tolist() + [int(argmax[2])]
    assert _rows(out, 1) == drafts[2:].tolist() + [int(argmax[6])]


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_mixed_greedy_and_random_batch(with_draft_probs):
    num_drafts = [3, 2, 0, 4, 1, 0, 3, 2]
    greedy = torch.tensor([True, False, True, False, True, False, False, True])
    logits, argmax, drafts = _random_case(num_drafts, vocab=30, seed=3)
    probs = logits.softmax(-1)
    draft_probs = torch.rand(sum(num_drafts), 30).softmax(-1) if with_draft_probs else None
    out = rejection_sample(probs, argmax, drafts, torch.tensor(num_drafts), draft_probs,
                           greedy)
    want = _greedy_reference(argmax, drafts, num_drafts)
    target, draft = _layout(num_drafts)
    for b in range(len(num_drafts)):
        got = _rows(out, b)
        if greedy[b]:
            assert got == want[b]
            continue
        # Random rows: an accepted draft prefix, then a token the target can emit.
        accepted = int(out.num_accepted[b])
        assert got[:accepted] == drafts[list(draft[b])[:accepted]].tolist()
        assert probs[target[b][accepted], got[-1]] > 0


def test_random_rows_accept_certain_drafts_and_reject_impossible_ones():
    vocab = 6
    probs = torch.zeros(6, vocab)
    # Request 0: the target is a point mass on each draft, then on token 5.
    probs[0, 2] = probs[1, 4] = probs[2, 5] = 1.0
    # Request 1 (no draft probs): its first draft has p = 0; the recovered token
    # must come from p without the draft token.
    probs[3] = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])
    probs[4] = probs[5] = 1.0 / vocab
    drafts = torch.tensor([2, 4, 0, 3])
    num_drafts = torch.tensor([2, 2])
    argmax = probs.argmax(-1)
    for seed in range(20):
        torch.manual_seed(seed)
        out = rejection_sample(probs, argmax, drafts, num_drafts, None,
                               torch.zeros(2, dtype=torch.bool))
        assert _rows(out, 0) == [2, 4, 5]
        assert out.num_accepted[1] == 0 and _rows(out, 1)[0] in (1, 4)


def test_a_zero_residual_falls_back_to_the_target():
    # q >= p everywhere: max(p - q, 0) is all zero. The draft token has p = 0, so
    # it is always rejected, and the replacement must still be a token p allows.
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    draft_probs = torch.tensor([[0.2, 0.5, 0.5, 0.0]])
    for seed in range(20):
        torch.manual_seed(seed)
        out = rejection_sample(probs, probs.argmax(-1), torch.tensor([0]), torch.tensor([1]),
                               draft_probs, torch.tensor([False]))
        assert out.num_accepted.tolist() == [0] and _rows(out, 0)[0] in (1, 2)


def test_zero_draft_probability_accepts_when_the_target_allows_it():
    probs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    draft_probs = torch.tensor([[1.0, 0.0, 0.0]])  # q(draft) = 0: must not crash
    out = rejection_sample(probs, probs.argmax(-1), torch.tensor([1]), torch.tensor([1]),
                           draft_probs, torch.tensor([False]))
    assert _rows(out, 0) == [1, 0]


def test_requests_without_drafts_only_sample():
    probs = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    out = rejection_sample(probs, probs.argmax(-1), torch.empty(0, dtype=torch.long),
                           torch.tensor([0, 0, 0]), None, torch.tensor([False, True, False]))
    assert out.token_ids.shape == (3, 1)
    assert out.num_accepted.tolist() == [0, 0, 0]
    assert out.token_ids[:2, 0].tolist() == [2, 1] and out.token_ids[2, 0] in (0, 1)


def test_an_empty_batch():
    out = rejection_sample(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                           torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                           None, torch.zeros(0, dtype=torch.bool))
    assert out.token_ids.shape == (0, 1) and out.num_accepted.shape == (0,)


# --- Exactness: the emitted tokens are distributed as the target's. ---------------

_P = torch.tensor([
    [0.30, 0.05, 0.25, 0.00, 0.15, 0.25],  # p_0 (token 3 impossible)
    [0.10, 0.20, 0.30, 0.15, 0.05, 0.20],  # p_1
    [0.40, 0.10, 0.10, 0.10, 0.10, 0.20],  # p_2, the bonus position
])
_Q = torch.tensor([
    [0.10, 0.40, 0.10, 0.20, 0.15, 0.05],  # q_0: puts mass where p_0 has none
    [0.30, 0.05, 0.05, 0.30, 0.20, 0.10],  # q_1
])
_TRIALS = 20000


def _chi_square(tokens: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of ``tokens`` against p, and its critical value at 0.001.

    A token p cannot emit makes the statistic infinite: that is a certain failure.
    """
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    support = p > 0
    if counts[~support].sum() > 0:
        return float("inf"), 0.0
    expected = counts.sum() * p[support].double()
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return stat, _CHI2_CRITICAL_0001[int(support.sum()) - 1]


def _run_identical_requests(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None):
    """_TRIALS copies of one request with two drafts, verified in one call."""
    torch.manual_seed(1234)
    target_probs = _P.repeat(_TRIALS, 1)
    flat_drafts = draft_tokens.reshape(-1)
    flat_q = None if draft_probs is None else draft_probs.repeat(_TRIALS, 1)
    return rejection_sample(target_probs, target_probs.argmax(-1), flat_drafts,
                            torch.full((_TRIALS,), 2), flat_q,
                            torch.zeros(_TRIALS, dtype=torch.bool))


def _assert_target_distributed(out):
    """First token ~ p_0; second (first accepted) ~ p_1; third (both accepted) ~ p_2."""
    for position in range(3):
        rows = out.num_accepted >= position
        tokens = out.token_ids[rows, position]
        assert tokens.numel() > 500, "too few samples to test"
        stat, critical = _chi_square(tokens, _P[position])
        assert stat < critical, f"position {position}: chi2 {stat:.1f} >= {critical}"


def test_sampled_drafts_give_the_target_distribution():
    gen = torch.Generator().manual_seed(7)
    # Each request's drafts really are samples of q, as the rule assumes.
    drafts = torch.stack([torch.multinomial(_Q[j], _TRIALS, replacement=True, generator=gen)
                          for j in range(2)], dim=1)
    out = _run_identical_requests(drafts, _Q)
    _assert_target_distributed(out)


def test_fixed_drafts_give_the_target_distribution():
    # n-gram style: the same proposal every time (a point mass q).
    drafts = torch.tensor([0, 2]).repeat(_TRIALS, 1)
    out = _run_identical_requests(drafts, None)
    _assert_target_distributed(out)


def test_the_chi_square_check_catches_always_accepting():
    # Negative control: "always accept the draft" emits q_0 (or the fixed draft)
    # at the first position, which the same check must reject.
    gen = torch.Generator().manual_seed(8)
    naive = torch.multinomial(_Q[0], _TRIALS, replacement=True, generator=gen)
    stat, critical = _chi_square(naive, _P[0])
    assert stat > critical
    # Even restricted to tokens p_0 allows, q_0's shape is far from p_0's.
    allowed = naive[_P[0][naive] > 0]
    stat, critical = _chi_square(allowed, _P[0])
    assert stat > critical
    naive_second = torch.multinomial(_Q[1], _TRIALS, replacement=True, generator=gen)
    stat, critical = _chi_square(naive_second, _P[1])
    assert stat > critical
    stat, critical = _chi_square(torch.full((_TRIALS,), 2), _P[0])
    assert stat > critical


# --- Seeded requests: their tokens do not depend on the batch. ----------------------


def _seeded(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 100 + j) for j in range(count)]


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_seeded_requests_ignore_the_rest_of_the_batch(with_draft_probs):
    vocab = 8
    num_drafts = [2, 3, 0, 4, 3]
    greedy = torch.tensor([False, True, False, False, False])
    logits, argmax, drafts = _random_case(num_drafts, vocab=vocab, seed=5, match=0.3)
    probs = (logits / 4).softmax(-1)  # flat enough that both outcomes happen
    draft_probs = None
    if with_draft_probs:
        # A confident draft (q(d) = 0.65), so acceptance is a real coin flip.
        draft_probs = torch.full((sum(num_drafts), vocab), 0.05)
        draft_probs[torch.arange(sum(num_drafts)), drafts] = 0.65
    target, draft = _layout(num_drafts)
    outcomes = set()
    for seed in range(12):
        # Requests 0 and 3 are seeded; 4 is not; 1 is greedy.
        gens = {0: _seeded(seed, 3), 3: _seeded(seed + 50, 5)}
        torch.manual_seed(seed)
        together = rejection_sample(probs, argmax, drafts, torch.tensor(num_drafts),
                                    draft_probs, greedy, gens)
        for b in (0, 3):
            t, d = list(target[b]), list(draft[b])
            torch.manual_seed(seed + 1000)  # different unseeded randomness
            alone = rejection_sample(
                probs[t], argmax[t], drafts[d], torch.tensor([num_drafts[b]]),
                None if draft_probs is None else draft_probs[d], torch.tensor([False]),
                {0: _seeded(seed if b == 0 else seed + 50, num_drafts[b] + 1)})
            assert _rows(alone, 0) == _rows(together, b)
            outcomes.add((b, int(together.num_accepted[b])))
    # The seeds exercised both rejections and acceptances.
    assert len({a for b, a in outcomes if b == 3}) > 1


def test_generators_must_cover_every_position():
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"generators\[0\] must hold n_b \+ 1 = 3"):
        rejection_sample(probs, probs.argmax(-1), torch.tensor([1, 2]), torch.tensor([2]),
                         None, torch.tensor([False]), {0: _seeded(0, 2)})


def test_a_layout_mismatch_is_rejected():
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"target_probs must be \[sum\(n_b \+ 1\) = 4"):
        rejection_sample(probs, probs.argmax(-1), torch.tensor([1, 2, 3]), torch.tensor([3]),
                         None, torch.tensor([False]))
    with pytest.raises(ValueError, match=r"draft_token_ids must be \[sum\(n_b\) = 2\]"):
        rejection_sample(probs, probs.argmax(-1), torch.tensor([1]), torch.tensor([2]),
                         None, torch.tensor([False]))
    with pytest.raises(ValueError, match="draft_probs must be"):
        rejection_sample(probs, probs.argmax(-1), torch.tensor([1, 2]), torch.tensor([2]),
                         torch.ones(2, 5), torch.tensor([False]))
