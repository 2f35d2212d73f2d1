"""The unified token-budget scheduler.

Every step hands out a budget of tokens ({request_id: num_tokens}) to running
requests first, then to waiting ones. Prompt and output tokens are treated
alike, so chunked prefill (a prompt spread over steps) and prefix caching (a
request starting with most of its prompt already computed) need no special
phases. When the KV pool runs dry a running request is preempted: its blocks
are freed and it goes back to waiting, to be recomputed later.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from backplane.config import CacheConfig, SchedulerConfig
from backplane.core.kv.kv_cache_manager import KVCacheManager
from backplane.core.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from backplane.core.scheduler.queues import make_waiting_queue
from backplane.core.scheduler.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class FinishedRequest:
    """A request that ended during `update_from_output` or `finish_requests`."""

    request: Request
    status: RequestStatus


class Scheduler:
    """Decides, step by step, which requests advance by how many tokens."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_kv_blocks: int,
        max_model_len: int,
        num_lookahead_tokens: int = 0,
        max_loras: int | None = None,
        pipeline_depth: int = 1,
    ) -> None:
        """``num_lookahead_tokens``: KV slots reserved past each step's tokens for a
        draft model to write its proposals into (speculative decoding).
        ``max_loras``: the most distinct LoRA adapters among running requests (the
        device's adapter slots); None without LoRA.
        ``pipeline_depth``: batches in flight at once (pipeline parallel: one per
        stage). Above 1, a request waiting for the token of a batch in flight is
        not planned again, a request in flight is never preempted, and each batch
        takes its share of the requests (1/depth) so that the batches balance."""
        self.config = scheduler_config
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.chunked_prefill = scheduler_config.enable_chunked_prefill
        self.policy = scheduler_config.scheduling_policy
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(
            num_kv_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting = make_waiting_queue(self.policy)
        self.running: list[Request] = []
        # Requests that left the running set since the last schedule(); the runner drops them.
        self._removed_ids: set[str] = set()
        self.num_preemptions = 0
        # Requests whose grammar failed to compile or whose adapter failed to load;
        # the engine core ends them.
        self.failed_requests: list[str] = []
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_loras = max_loras
        self.spec_stats = SpecDecodeStats()
        self.pipeline_depth = pipeline_depth
        # Pipeline: in how many planned, not yet updated batches each request is.
        self._in_flight: Counter[str] = Counter()

    # ----------------------------------------------------------------- requests
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside the step (abort, stop string); frees their blocks."""
        ended = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._release(request)
            ended.append(request)
        return ended

    def _release(self, request: Request) -> None:
        self.kv.free(request)
        self._removed_ids.add(request.request_id)
        del self.requests[request.request_id]

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ----------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: set[str] = set()
        spec_tokens: dict[str, list[int]] = {}
        pipelined = self.pipeline_depth > 1
        # A pipeline's batches share the requests: each takes at most its 1/depth part.
        max_reqs = (-(-(len(self.running) + len(self.waiting)) // self.pipeline_depth)
                    if pipelined else self.max_num_seqs)

        # Running requests first, in order; preempt from the back when blocks run out.
        index = 0
        while index < len(self.running) and budget > 0 and len(num_scheduled) < max_reqs:
            request = self.running[index]
            if pipelined and request.num_output_placeholders:
                # Its next input is the token a batch in flight is still sampling.
                index += 1
                continue
            # A token still being sampled (async scheduling) counts as known...
            known = request.num_tokens + request.num_output_placeholders
            num_known_new = known - request.num_computed_tokens
            # Draft tokens ride along after the known ones, as far as the budget goes.
            num_new = min(num_known_new + len(request.spec_token_ids), budget)
            # ...unless it is the request's last: it ends there, so plan nothing more.
            if request.num_output_placeholders and known >= request.max_total_tokens:
                num_new = 0
            if num_new <= 0:
                index += 1
                continue
            while True:
                block_ids = self.kv.allocate_slots(
                    request, num_new, request.num_computed_tokens,
                    num_lookahead_tokens=self._lookahead(request, num_new),
                )
                if block_ids is not None:
                    break
                victim = self._pick_victim()
                if victim is None:
                    break  # every candidate is in a batch in flight: wait for one to end
                if self.running.index(victim) < index:
                    index -= 1  # the victim sat before the current request
                self._preempt(victim)
                preempted.add(victim.request_id)
                budget += num_scheduled.pop(victim.request_id, 0)
                if victim is request:
                    break
            if block_ids is None:
                break
            cached_reqs.append(
                CachedRequestData(request.request_id, block_ids, request.num_computed_tokens)
            )
            num_scheduled[request.request_id] = num_new
            num_spec = num_new - num_known_new
            if num_spec > 0:
                spec_tokens[request.request_id] = request.spec_token_ids[:num_spec]
            budget -= num_new
            index += 1
        # A request preempted after being scheduled this step cannot stay in the plan.
        cached_reqs = [c for c in cached_reqs if c.request_id not in preempted]
        for request_id in preempted:
            spec_tokens.pop(request_id, None)

        # Then waiting requests, unless this step already had to preempt. Requests
        # whose grammar is still compiling, whose adapter is still loading, or whose
        # adapter would be one too many for the device's slots step aside for the
        # ones behind them.
        deferred: list[Request] = []
        adapters = ({r.lora_key for r in self.running} - {None}
                    if self.max_loras is not None else set())
        while (
            not preempted
            and len(self.waiting)
            and budget > 0
            and len(self.running) < self.max_num_seqs
            and len(num_scheduled) < max_reqs
        ):
            request = self.waiting.peek()
            key = request.lora_key
            if (not self._inputs_ready(request)
                    or (key is not None and key not in adapters
                        and len(adapters) >= self.max_loras)):
                deferred.append(self.waiting.pop())
                continue
            hit_blocks, num_computed = [], 0
            if request.num_computed_tokens == 0:
                hit_blocks, num_computed = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_computed
            if num_new > budget:
                if not self.chunked_prefill:
                    break
                num_new = budget
            block_ids = self.kv.allocate_slots(
                request, num_new, num_computed, hit_blocks,
                num_lookahead_tokens=self._lookahead(request, num_computed + num_new))
            if block_ids is None:
                break
            self.waiting.pop()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed
            self.running.append(request)
            if key is not None:
                adapters.add(key)
            new_reqs.append(
                NewRequestData(
                    request.request_id,
                    list(request.all_token_ids),
                    request.num_prompt_tokens,
                    block_ids,
                    num_computed,
                    request.params,
                    request.grammar,
                    request.lora_key,
                    request.lora_weights,
                )
            )
            num_scheduled[request.request_id] = num_new
            budget -= num_new
        for request in reversed(deferred):
            self.waiting.prepend(request)

        removed = self._removed_ids
        self._removed_ids = set()
        out = SchedulerOutput(
            new_requests=new_reqs,
            cached_requests=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            removed_request_ids=removed,
            preempted_request_ids=preempted,
            scheduled_spec_tokens=spec_tokens,
        )
        # Tokens handed out now count as computed; update_from_output samples on top.
        # A request whose every known token is then computed samples one more in
        # this step: a placeholder until update_from_output appends it.
        for request_id, count in num_scheduled.items():
            request = self.requests[request_id]
            if pipelined:
                self._in_flight[request_id] += 1
            request.num_computed_tokens += count
            request.spec_token_ids = []  # verified by this step (or dropped by the budget)
            out.scheduled_requests[request_id] = request
            if request.num_computed_tokens >= request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1
                out.sampling_request_ids.add(request_id)
        return out

    def _lookahead(self, request: Request, num_tokens_after: int) -> int:
        """Slots to reserve past ``num_tokens_after`` for the draft model's proposals,
        never past max_model_len (the block table has no room beyond it)."""
        if not self.num_lookahead_tokens:
            return 0
        return max(0, min(self.num_lookahead_tokens,
                          self.max_model_len - request.num_computed_tokens - num_tokens_after))

    def _inputs_ready(self, request: Request) -> bool:
        """Whether a waiting request's off-thread inputs are ready: its structured-output
        grammar (compiling) and its LoRA adapter (loading). One that failed ends the
        request as aborted (the engine core reports it), with the reason logged."""
        return (self._future_ready(request, "grammar_future", "grammar",
                                   "structured-output grammar failed to compile")
                and self._future_ready(request, "lora_future", "lora_weights",
                                       "LoRA adapter failed to load"))

    def _future_ready(self, request: Request, future_attr: str, result_attr: str,
                      failure: str) -> bool:
        future = getattr(request, future_attr)
        if future is None or getattr(request, result_attr) is not None:
            return True
        if not future.done():
            return False
        try:
            setattr(request, result_attr, future.result())
        except Exception as exc:  # noqa: BLE001 - a failure ends only this request
            logger.error("request %s: its %s: %s", request.request_id, failure, exc)
            self.failed_requests.append(request.request_id)
            return False
        return True

    def _pick_victim(self) -> Request | None:
        """The running request to preempt; None when each is in a batch in flight (its
        blocks are being written; it is preempted, if need be, once the batch ends)."""
        candidates = ([r for r in self.running if r.request_id not in self._in_flight]
                      if self._in_flight else self.running)
        if not candidates:
            return None
        if self.policy == "priority":
            return max(candidates, key=Request.sort_key)
        return candidates[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        # A token still in flight for it is dropped; it is sampled again on resume
        # (seeded draws are replayed, so the result is the same).
        request.num_output_placeholders = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._removed_ids.add(request.request_id)
        self.waiting.prepend(request)
        logger.debug("preempted %s (recompute later)", request.request_id)

    # ------------------------------------------------------------------- update
    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled: dict[str, int | list[int]],
        grammar_finished: set[str] | frozenset[str] = frozenset(),
        spec_token_ids: dict[str, list[int]] | None = None,
    ) -> tuple[list[Request], list[Request]]:
        """Append sampled tokens and end requests that hit a stop condition.

        Args:
            sampled: {request_id: token or tokens} for requests whose step reached
                a sampling point (every known token computed). With speculative
                decoding a request gets its accepted drafts and one more token;
                tokens after a stop condition are dropped.
            grammar_finished: requests whose structured-output grammar reached its
                end with this token: they stop here, like at EOS.
            spec_token_ids: {request_id: drafts to verify in the next step}.

        Returns:
            (requests that got new tokens, requests that finished this step)
        """
        progressed, finished = [], []
        planned = scheduler_output.scheduled_requests
        verified = scheduler_output.scheduled_spec_tokens
        for request_id in scheduler_output.sampling_request_ids:
            request = planned[request_id]
            request.num_output_placeholders = max(0, request.num_output_placeholders - 1)
        if self.pipeline_depth > 1:
            self._in_flight.subtract(scheduler_output.num_scheduled_tokens.keys())
            self._in_flight = +self._in_flight  # drop the zeros
        for request_id, tokens in sampled.items():
            request = self.requests.get(request_id)
            # The very request planned (an id may be reused once its request ended),
            # still running (not finished, aborted or preempted since).
            if (request is None or request.status != RequestStatus.RUNNING
                    or (planned and planned.get(request_id) is not request)):
                continue
            if isinstance(tokens, int):
                tokens = (tokens,)
            num_drafts = len(verified.get(request_id, ()))
            if num_drafts:
                # Rejected drafts' KV is not computed: those slots are written again.
                num_accepted = len(tokens) - 1
                request.num_computed_tokens -= num_drafts - num_accepted
                self.spec_stats.record(num_drafts, num_accepted)
            for token in tokens:
                request.append_output_token(token)
                if request.check_stop():
                    break
            progressed.append(request)
            if request_id in grammar_finished and not request.status.finished:
                request.status = RequestStatus.FINISHED_STOPPED
            if request.status.finished:
                self.running.remove(request)
                self._release(request)
                finished.append(request)
            elif spec_token_ids:
                request.spec_token_ids = spec_token_ids.get(request_id, [])
        return progressed, finished


@dataclass
class SpecDecodeStats:
    """Speculative-decoding counters since start-up (what /metrics and the log report).

    Attributes:
        num_drafts: verification passes of one request (steps that had drafts).
        num_draft_tokens: draft tokens verified.
        num_accepted_tokens: draft tokens accepted.
        accepted_per_position: how often the draft at position i (0-based) was accepted.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position += [0] * (num_drafts - len(self.accepted_per_position))
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1
