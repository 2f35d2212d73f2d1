"""Random sampling draws from the processed distribution: frequencies over many draws
match the probabilities, zero-probability tokens never come up, seeded rows repeat."""

from __future__ import annotations

import torch

from backplane.core.sampling.sampler import sample_inverse_cdf


def test_frequencies_match_the_probabilities_and_zeros_are_never_drawn():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    draws = 40_000
    # Unnormalised rows (a scaled copy) sample the same distribution.
    batch = torch.stack([probs, 7.0 * probs]).repeat(draws // 2, 1)
    tokens = sample_inverse_cdf(batch, {})
    counts = torch.bincount(tokens, minlength=6).double() / draws
    assert counts[1] == 0 and counts[5] == 0
    # 4 standard deviations of a binomial proportion at p = 0.5 over 40k draws: 0.01.
    assert torch.allclose(counts, probs.double(), atol=0.01), counts


def test_a_row_with_one_token_always_draws_it_even_at_the_end():
    probs = torch.zeros(3, 152_000)
    probs[0, 151_999] = 1.0
    probs[1, 0] = 1e-30  # tiny but the only mass
    probs[2, 77] = 2.0
    assert sample_inverse_cdf(probs, {}).tolist() == [151_999, 0, 77]


def test_seeded_rows_repeat_whatever_the_batch():
    probs = torch.softmax(torch.randn(4, 1000), dim=-1)

    def seeded(rows):
        return {r: torch.Generator().manual_seed(123) for r in rows}

    alone = sample_inverse_cdf(probs[2:3], seeded([0]))
    in_batch = sample_inverse_cdf(probs, seeded([2]))
    assert in_batch[2] == alone[0]


def test_the_sampler_without_truncation_draws_from_the_tempered_softmax():
    """The in-place path (no top-k/top-p/min-p) samples softmax(logits / T)."""
    from backplane.core.sampling.metadata import SamplingMetadata
    from backplane.core.sampling.sampler import Sampler

    torch.manual_seed(1)
    logits = torch.tensor([2.0, 0.0, 1.0, float("-inf")]).repeat(20_000, 1)
    temperature = torch.full((20_000,), 0.5)
    fields = {name: None for name in SamplingMetadata.__dataclass_fields__}
    fields.update(all_greedy=False, temperature=temperature, generators={})
    tokens = Sampler._sample(logits.clone(), SamplingMetadata(**fields))
    expected = torch.softmax(logits[0] / 0.5, dim=-1)
    counts = torch.bincount(tokens, minlength=4).double() / 20_000
    assert counts[3] == 0
    assert torch.allclose(counts, expected.double(), atol=0.015), counts
