"""Sampling parameters that pass validation but vanish in the engine's float32 tensors.

Schema fuzzing found them: ``top_p`` and ``repetition_penalty`` only have to be
> 0, yet below float32's smallest value (about 1.4e-45) they become 0.0 in the
sampling batch. top_p 0 then keeps no token at all (sampler._top_k_top_p) and a
penalty of 0 divides logits by zero, so every generated token is id 0 (<unk>,
skipped when decoding): a 200 with an empty text. The request should either be
refused (400 naming the field) or behave like the limit it approaches (top_p ->
0 keeps the most likely token, as greedy does). SamplingParams now refuses
values outside float32's range, and top_p always keeps the most likely token.
"""

from __future__ import annotations

import pytest

from tests.reliability.support import assert_openai_error, assert_serving_as_before

BASE = {
    "prompt": "In the beginning",
    "max_tokens": 6,
    "ignore_eos": True,
    "seed": 1,
    "logprobs": 1,
    "return_tokens_as_token_ids": True,
}
BELOW_FLOAT32 = 1e-46


@pytest.mark.parametrize("field", ["top_p", "repetition_penalty"])
def test_sampling_values_below_float32_range_are_refused_or_honoured(
    server, greedy_reference, field
):
    with server.client() as c:
        resp = c.post("/v1/completions", json={**BASE, field: BELOW_FLOAT32})
    try:
        if resp.status_code != 200:
            assert assert_openai_error(resp, 400, 400)["param"] == field
        else:
            tokens = resp.json()["choices"][0]["logprobs"]["tokens"]
            assert set(tokens) != {"token_id:0"}, f"{field}={BELOW_FLOAT32}: only <unk> came out"
    finally:
        assert_serving_as_before(server, greedy_reference)
