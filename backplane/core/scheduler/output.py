"""What the scheduler tells the model runner each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from backplane.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request entering the runner's batch (first time, or resumed after preemption)."""

    request_id: str
    token_ids: list[int]  # every known token: prompt, plus outputs when resumed
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    # The request's structured-output matcher (None: unconstrained). The runner
    # masks and advances it; it lives in the same process as the scheduler.
    grammar: object | None = None
    # LoRA: the adapter's identity and loaded weights (None: the base model).
    lora_key: str | None = None
    lora_weights: object | None = None


@dataclass
class CachedRequestData:
    """A request already in the runner's batch that advances this step."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One step's plan: how many tokens each request advances.

    Attributes:
        num_scheduled_tokens: {request_id: tokens this step}.
        removed_request_ids: requests to drop from the runner's batch before this
            step (finished, aborted or preempted since the previous step).
    """

    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    removed_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)
    # The request objects planned, and those whose step ends in a sampled token.
    # `update_from_output` matches results against these objects, not only ids:
    # with async scheduling a result may arrive after its request ended.
    scheduled_requests: dict = field(default_factory=dict)
    sampling_request_ids: set[str] = field(default_factory=set)
    # Speculative decoding: {request_id: draft tokens verified this step}. They are
    # part of num_scheduled_tokens (after the request's known tokens).
    scheduled_spec_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0
