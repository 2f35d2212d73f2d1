"""top_p never filters out every token, and sampling values that float32 cannot hold
are refused by SamplingParams (the sampler's tensors are float32)."""

from __future__ import annotations

import pytest
import torch

from backplane.core.sampling.sampler import _top_k_top_p
from backplane.sampling_params import SamplingParams


def test_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    kept = _top_k_top_p(probs, None, torch.tensor([0.0, 1e-46], dtype=torch.float32))
    assert kept.argmax(dim=1).tolist() == [1, 0]
    assert (kept > 0).sum(dim=1).tolist() == [1, 1]


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_p", 1e-46), ("repetition_penalty", 1e-300), ("repetition_penalty", 1e39),
     ("temperature", 1e39)],
)
def test_values_outside_float32_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be in"):
        SamplingParams(**{field: value})
