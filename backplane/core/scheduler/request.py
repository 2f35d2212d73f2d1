"""A request as the scheduler and KV cache manager see it."""

from __future__ import annotations

import enum
import time

from backplane.sampling_params import SamplingParams


def lora_key(lora_request) -> str:
    """An adapter's identity: its name and where it was loaded from."""
    return f"{lora_request.lora_name}@{lora_request.lora_path}"


class RequestStatus(enum.Enum):
    """Lifecycle of a request inside the engine core."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence being generated.

    The scheduler treats prompt and output tokens alike: ``num_tokens`` is how
    many tokens the sequence has, ``num_computed_tokens`` how many of them have
    KV in the cache. A step advances a request by some number of tokens; once
    every known token is computed, the step also samples a new one.

    Attributes:
        max_total_tokens: prompt + max_tokens, capped by max_model_len.
        block_hashes: chained hashes of this request's full blocks, grown lazily
            by the KV cache manager (prefix caching).
        cache_salt: mixed into the first block's hash, so that only requests with
            the same salt share cached blocks.
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "all_token_ids", "params",
        "priority", "arrival_time", "status", "num_computed_tokens", "num_cached_tokens",
        "max_total_tokens", "eos_token_ids", "stop_reason", "block_hashes", "num_preemptions",
        "cache_salt", "num_output_placeholders", "grammar_future", "grammar", "spec_token_ids",
        "lora_request", "lora_key", "lora_future", "lora_weights",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_model_len: int,
        eos_token_ids: frozenset[int] = frozenset(),
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        lora_request=None,
    ) -> None:
        self.request_id = request_id
        self.cache_salt = cache_salt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 = not yet
        limit = max_model_len
        if params.max_tokens is not None:
            limit = min(limit, len(prompt_token_ids) + params.max_tokens)
        self.max_total_tokens = limit
        self.eos_token_ids = eos_token_ids
        self.stop_reason: int | str | None = None
        self.block_hashes: list[int] = []
        self.num_preemptions = 0
        # Tokens being sampled by a step still in flight (async scheduling): the
        # scheduler plans the next step as if they were already appended.
        self.num_output_placeholders = 0
        # Structured outputs: the grammar being compiled (a Future) and, once it is
        # ready, the request's matcher. The scheduler holds the request back until then.
        self.grammar_future = None
        self.grammar = None
        # Speculative decoding: draft tokens proposed after the last step, verified
        # (and then dropped or accepted) by the next one.
        self.spec_token_ids: list[int] = []
        # LoRA: the adapter asked for (a backplane.lora.LoRARequest, None: the base
        # model), its weights being loaded (a Future) and, once loaded, the weights.
        self.lora_request = lora_request
        # The adapter's identity (None: the base model), compared every step.
        self.lora_key = None if lora_request is None else lora_key(lora_request)
        self.lora_future = None
        self.lora_weights = None

    @property
    def prefix_salt(self) -> str | None:
        """What keeps this request's cached KV apart: its cache_salt and its adapter (two
        adapters compute different KV for the same tokens)."""
        key = self.lora_key
        if key is None:
            return self.cache_salt
        return f"{self.cache_salt or ''}\x00lora:{key}"

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> bool:
        """After appending a token: set a finished status if generation must end here."""
        token = self.output_token_ids[-1]
        params = self.params
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if token in params.all_stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = token
                return True
        if self.num_tokens >= self.max_total_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def sort_key(self) -> tuple[int, float]:
        """Priority-policy order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time)
