"""What generation returns: RequestOutput and CompletionOutput (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field

# {token_id: Logprob} for one position: the chosen token plus the top-k.
SampleLogprobs = list[dict[int, "Logprob"]]
PromptLogprobs = list[dict[int, "Logprob"] | None]


@dataclass
class Logprob:
    """Log-probability of one token at one position, with its rank and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions.

    finish_reason is None while generating, then "stop" (EOS, stop string or
    stop token), "length" (max_tokens or max_model_len) or "abort". stop_reason
    is the stop string or stop token id that ended it, if any.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state as seen by the caller: prompt and its completions so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0
