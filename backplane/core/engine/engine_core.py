"""EngineCore: the schedule -> execute -> update loop, free of tokenizers and text."""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from backplane.config.resolve import ResolvedConfig
from backplane.core.executor import make_executor
from backplane.core.model_runner.runner import LaunchedStep, ModelRunner, TokenLogprobs
from backplane.core.scheduler.output import SchedulerOutput
from backplane.core.scheduler.request import Request, RequestStatus
from backplane.core.scheduler.scheduler import Scheduler
from backplane.plugins_sdk import Platform

logger = logging.getLogger(__name__)


@dataclass
class EngineCoreOutput:
    """What happened to one request in one step."""

    request_id: str
    new_token_ids: list[int]
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None
    finish_status: RequestStatus | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


@dataclass
class StepTiming:
    """Wall time of the last step, split into the model forward and everything else."""

    total_seconds: float = 0.0
    forward_seconds: float = 0.0
    num_tokens: int = 0
    num_reqs: int = 0
    # Filling and moving the structured-output token bitmasks (0 without constraints).
    grammar_mask_seconds: float = 0.0
    # Rank 0's time in collectives (tensor/pipeline parallel; 0 for one rank).
    comm_seconds: float = 0.0


class EngineCore:
    """Owns the scheduler and the model runner; advances every request by one step."""

    def __init__(self, config: ResolvedConfig, platform: Platform, tokenizer=None) -> None:
        """``tokenizer``: the front-end's, when it shares this process (structured
        outputs need one; an engine-core process loads its own at the first use)."""
        self.config = config
        self._tokenizer = tokenizer
        # The ranks of the model (one, or a split model's processes); rank 0 is here.
        self.executor = make_executor(config, platform)
        self.model_runner: ModelRunner = self.executor.runner
        spec = config.speculative_config
        # Pipeline parallel: one batch in flight per stage keeps every stage busy.
        self.pipeline_depth = config.parallel_config.pipeline_parallel_size
        self._pipeline: deque[tuple[SchedulerOutput, LaunchedStep]] = deque()
        # The most batches that were in flight at once (a pipeline diagnostic).
        self.peak_batches_in_flight = 0
        self.scheduler = Scheduler(
            config.scheduler_config, config.cache_config, self.model_runner.num_blocks,
            config.max_model_len,
            # A draft model writes its k proposals past each step's tokens.
            num_lookahead_tokens=spec.num_speculative_tokens if spec and spec.uses_model else 0,
            max_loras=config.lora_config.max_loras if config.lora_config else None,
            pipeline_depth=self.pipeline_depth,
        )
        # LoRA adapters are read from disk off the engine thread and kept in a host LRU.
        self.lora_adapters = None
        if config.lora_config is not None:
            from backplane.core.lora.adapter_cache import LoRAAdapterCache

            self.lora_adapters = LoRAAdapterCache(
                self.model_runner.lora.targets, config.lora_config.max_lora_rank,
                config.lora_config.max_cpu_loras)
        self.last_step = StepTiming()
        # Async scheduling: the model step runs on this worker thread while the
        # engine thread plans the next step and processes the previous one's output.
        self.async_scheduling = bool(config.scheduler_config.async_scheduling)
        self._step_thread = (ThreadPoolExecutor(1, thread_name_prefix="backplane-model-step")
                             if self.async_scheduling else None)
        self._in_flight: tuple[SchedulerOutput, Future] | None = None
        self._structured = None  # StructuredOutputManager, built at the first use
        # Outputs produced outside a model step (a grammar that failed to compile).
        self._side_outputs: list[EngineCoreOutput] = []

    @property
    def structured_outputs(self):
        """The grammar manager of this engine core (tokenizer loaded at the first use)."""
        if self._structured is None:
            from backplane.core.loader.tokenizer import load_tokenizer
            from backplane.core.structured_outputs import StructuredOutputManager

            mc = self.config.model_config
            tokenizer = self._tokenizer or load_tokenizer(
                mc.tokenizer_path, trust_remote_code=mc.trust_remote_code,
                use_fast=mc.tokenizer_mode != "slow")
            eos = set(self.config.model_spec.eos_token_ids)
            if tokenizer.eos_token_id is not None:
                eos.add(int(tokenizer.eos_token_id))
            self._structured = StructuredOutputManager(
                tokenizer, self.config.model_spec.vocab_size,
                default_backend=self.config.structured_outputs_config.backend,
                eos_token_ids=sorted(eos))
        return self._structured

    def add_request(self, request: Request) -> None:
        if request.lora_request is not None:
            if self.lora_adapters is None:
                raise ValueError("lora_request needs an engine started with enable_lora")
            # Loaded (or found in the host cache) off this thread; the scheduler waits.
            request.lora_weights, request.lora_future = self.lora_adapters.get(
                request.lora_request)
        constraint = request.params.structured_outputs
        if constraint is not None:
            # Compiled off this thread; the scheduler waits for it without stalling others.
            request.grammar_future = self.structured_outputs.submit(constraint)
        self.scheduler.add_request(request)

    def _schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        failed, self.scheduler.failed_requests = self.scheduler.failed_requests, []
        for request in self.scheduler.finish_requests(dict.fromkeys(failed),
                                                      RequestStatus.FINISHED_ABORTED):
            self._side_outputs.append(EngineCoreOutput(
                request.request_id, [], finish_status=request.status))
        return out

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or self._in_flight is not None
                or bool(self._pipeline))

    def step(self) -> list[EngineCoreOutput]:
        if self.pipeline_depth > 1:
            outputs = self._step_pipelined()
        elif self.async_scheduling:
            outputs = self._step_overlapped()
        else:
            outputs = self._step_sync()
        if self._side_outputs:
            outputs, self._side_outputs = self._side_outputs + outputs, []
        return outputs

    def _step_sync(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        sched_out = self._schedule()
        if sched_out.is_empty:
            # Nothing fits (should not happen with a correctly sized cache); let the
            # runner drop removed rows anyway so no state lingers.
            self.executor.execute(sched_out)
            return []
        result = self.executor.execute(sched_out)
        return self._outputs(sched_out, result, start)

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """One step of a pipeline-parallel engine: fill the pipeline, then finish the
        oldest batch.

        Up to ``pipeline_depth`` batches of different requests are in flight: while
        the later stages work on batch A, stage 0 (this process) starts batch B.
        The scheduler keeps a request whose token is still being sampled out of
        new batches and balances the requests over the batches, so a step that
        finishes A launches A's next batch while B is in the later stages.
        """
        start = time.perf_counter()
        launch_seconds = 0.0  # stage 0's forward of the batches launched in this step
        while len(self._pipeline) < self.pipeline_depth:
            plan = self._schedule()
            if plan.is_empty:
                # Its removed rows still reach every rank (launched and collected at
                # once; no batch in flight is disturbed by that).
                if plan.removed_request_ids or not self._pipeline:
                    self.executor.execute(plan)
                break
            launched = self.executor.launch(plan)
            launch_seconds += launched.forward_seconds
            self._pipeline.append((plan, launched))
        self.peak_batches_in_flight = max(self.peak_batches_in_flight, len(self._pipeline))
        if not self._pipeline:
            return []
        plan, launched = self._pipeline.popleft()
        result = self.executor.collect(launched)
        # The step's model time: what it launched plus waiting for the collected batch
        # (that batch's own launch counted in the step that launched it).
        result.forward_seconds += launch_seconds - launched.forward_seconds
        return self._outputs(plan, result, start)

    def _step_overlapped(self) -> list[EngineCoreOutput]:
        """One step with the next one planned while it runs (``--async-scheduling``).

        Order: plan step N+1 (requests sampling in step N count one placeholder
        token), wait for step N, launch step N+1, then turn step N's tokens into
        outputs while N+1 runs. Step N+1 reads step N's tokens from the runner's
        batch, which step N wrote before finishing, so every request computes
        exactly what the synchronous loop computes; a request that step N ends
        (stop, length, abort) had one extra token computed in N+1, which is
        dropped. Its KV blocks are freed at once: nothing can reuse them before
        N+1 is done, since every step starts after the previous one finished.
        """
        start = time.perf_counter()
        if self._in_flight is None:
            first = self._schedule()
            if first.is_empty:
                self.executor.execute(first)  # drops removed rows, computes nothing
                return []
            self._in_flight = (first, self._step_thread.submit(self.executor.execute, first))
        current, running = self._in_flight
        self._in_flight = None
        upcoming = self._schedule()  # overlaps the device work of `current`
        result = running.result()
        if upcoming.is_empty:
            self.executor.execute(upcoming)
        else:
            self._in_flight = (upcoming,
                               self._step_thread.submit(self.executor.execute, upcoming))
        outputs = self._outputs(current, result, start)
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests():
            # Every request ended with `current`: the step in flight only computed
            # tokens nobody will read. Wait for it so the runner is idle again.
            self._in_flight[1].result()
            self._in_flight = None
        return outputs

    def check_health(self) -> None:
        """Raise `WorkerDiedError` when a rank of the model is gone."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the model-step thread (async scheduling), after the step in flight, then
        the other ranks."""
        if self._step_thread is not None:
            self._step_thread.shutdown(wait=True)
        self.executor.shutdown()

    def _outputs(self, sched_out: SchedulerOutput, result, start: float) -> list[EngineCoreOutput]:
        """Apply a finished step's sampled tokens and describe what changed per request."""
        # Finished requests are among the progressed ones, with a finish_status.
        # With speculative decoding a step may add several tokens; those after a stop
        # (EOS, stop token, length) are dropped by the scheduler: count what it kept.
        outputs_before = None
        if self.config.speculative_config is not None:
            planned = sched_out.scheduled_requests
            outputs_before = {rid: planned[rid].num_output_tokens for rid in result.sampled
                              if rid in planned}
        progressed, _ = self.scheduler.update_from_output(
            sched_out, result.sampled, result.grammar_finished, result.spec_token_ids)
        outputs = []
        for request in progressed:
            rid = request.request_id
            kept = 1 if outputs_before is None else request.num_output_tokens - (
                outputs_before.get(rid, request.num_output_tokens - 1))
            logprobs = result.logprobs.get(rid)
            if logprobs is not None and kept < logprobs.ids.shape[0]:
                logprobs = TokenLogprobs(logprobs.ids[:kept], logprobs.logprobs[:kept],
                                         logprobs.ranks[:kept])
            outputs.append(EngineCoreOutput(
                request_id=rid,
                new_token_ids=request.output_token_ids[-kept:],
                logprobs=logprobs,
                prompt_logprobs=result.prompt_logprobs.get(rid),
                finish_status=request.status if request.status.finished else None,
                stop_reason=request.stop_reason,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            ))
        # Prompt logprobs of prefill chunks that did not sample yet still travel.
        reported = {o.request_id for o in outputs}
        for rid, chunk in result.prompt_logprobs.items():
            if rid not in reported:
                outputs.append(EngineCoreOutput(request_id=rid, new_token_ids=[],
                                                prompt_logprobs=chunk))
        self.last_step = StepTiming(
            total_seconds=time.perf_counter() - start,
            forward_seconds=result.forward_seconds,
            num_tokens=sched_out.total_num_scheduled_tokens,
            num_reqs=len(sched_out.num_scheduled_tokens),
            grammar_mask_seconds=result.grammar_mask_seconds,
            comm_seconds=result.comm_seconds,
        )
        return outputs
