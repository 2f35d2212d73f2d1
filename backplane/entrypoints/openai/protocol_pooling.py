"""Request and response bodies of ``/v1/embeddings`` (OpenAI's), ``/pooling``, ``/score``
and ``/rerank`` (vLLM's)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from backplane.entrypoints.openai.protocol import TokenId, UsageInfo, _Request
from backplane.sampling_params import INT64_MAX

# A string, a batch of strings, one token-id prompt or a batch of token-id prompts.
EmbeddingInput = str | list[str] | list[TokenId] | list[list[TokenId]]


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings`` (OpenAI's fields; ``normalize`` and
    ``truncate_prompt_tokens``/``add_special_tokens`` are vLLM's)."""

    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    user: str | None = None
    normalize: bool | None = None
    add_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None


class PoolingRequest(EmbeddingRequest):
    """``POST /pooling`` (vLLM's): the raw pooled hidden state (not normalised by default)."""


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | str


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: UsageInfo


class ScoreRequest(_Request):
    """``POST /score`` (vLLM's): ``text_1`` scored against each of ``text_2`` (one text_1)
    or pairwise (as many as text_2)."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankRequest(_Request):
    """``POST /rerank`` (vLLM's Jina/Cohere-style): ``documents`` ranked against ``query``."""

    model: str | None = None
    query: str
    documents: list[str]
    top_n: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0  # 0: every document


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
