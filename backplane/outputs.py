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


# ---------------------------------------------------------------------- pooling
@dataclass
class PoolingOutput:
    """The pooler's output for one prompt: ``data`` is a 1-D float32 tensor."""

    data: object  # torch.Tensor (kept untyped so this module stays torch-free)


@dataclass
class PoolingRequestOutput:
    """A finished pooling request (vLLM's shape): the prompt and its pooled output."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None


@dataclass
class EmbeddingOutput:
    """One embedding as a list of floats."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput):
    """What `LLM.embed` returns per prompt: ``outputs`` is an `EmbeddingOutput`
    (``outputs.embedding``, a list of floats)."""

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> EmbeddingRequestOutput:
        return cls(out.request_id, EmbeddingOutput(out.outputs.data.tolist()),
                   out.prompt_token_ids, out.finished, out.prompt)


@dataclass
class ScoringOutput:
    """The similarity score of one text pair."""

    score: float


@dataclass
class ScoringRequestOutput:
    """What `LLM.score` returns per pair: ``outputs.score``."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True
