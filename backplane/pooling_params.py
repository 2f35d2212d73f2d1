"""PoolingParams: what a pooling request (embed / encode) asks for (vLLM's shape)."""

from __future__ import annotations

from dataclasses import dataclass

POOLING_TASKS = ("embed", "encode", "score")


@dataclass
class PoolingParams:
    """Per-request options of a pooling model.

    Attributes:
        task: ``"embed"`` (one pooled, optionally normalised vector per prompt)
            or ``"encode"`` (the same pooled vector, never normalised: the raw
            pooler output) or ``"score"`` (a cross-encoder's activated logits for
            a text pair: `LLM.score`, /score, /rerank). None means ``"embed"``.
        dimensions: keep only the first ``dimensions`` values of the embedding
            and re-normalise (matryoshka models only; refused otherwise).
        normalize: override the model's normalisation (None: the model's).
    """

    task: str | None = None
    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"pooling task {self.task!r} must be one of {POOLING_TASKS}")
        if self.dimensions is not None:
            if isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int):
                raise TypeError(f"dimensions must be an int, got {self.dimensions!r}")
            if self.dimensions < 1:
                raise ValueError(f"dimensions ({self.dimensions}) must be >= 1")
