"""Comparing two runs of one prompt through their prompt logprobs."""

from __future__ import annotations


def prompt_logprob_gaps(reference, other) -> list[float]:
    """|Δ logprob| of each prompt token (after the first, which has no context) between two
    `RequestOutput`s of the same prompt, both generated with ``prompt_logprobs``."""
    return [abs(x[t].logprob - y[t].logprob) for x, y, t in
            zip(reference.prompt_logprobs[1:], other.prompt_logprobs[1:],
                reference.prompt_token_ids[1:], strict=True)]
