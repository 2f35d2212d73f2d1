"""EngineCore: the schedule -> execute -> update loop, free of tokenizers and text."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from backplane.config.resolve import ResolvedConfig
from backplane.core.model_runner.runner import ModelRunner, TokenLogprobs
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


class EngineCore:
    """Owns the scheduler and the model runner; advances every request by one step."""

    def __init__(self, config: ResolvedConfig, platform: Platform) -> None:
        self.config = config
        self.model_runner = ModelRunner(config, platform)
        self.scheduler = Scheduler(
            config.scheduler_config, config.cache_config, self.model_runner.num_blocks,
            config.max_model_len,
        )
        self.last_step = StepTiming()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            # Nothing fits (should not happen with a correctly sized cache); let the
            # runner drop removed rows anyway so no state lingers.
            self.model_runner.execute(sched_out)
            return []
        result = self.model_runner.execute(sched_out)
        # Finished requests are among the progressed ones, with a finish_status.
        progressed, _ = self.scheduler.update_from_output(sched_out, result.sampled)
        outputs = []
        for request in progressed:
            rid = request.request_id
            outputs.append(EngineCoreOutput(
                request_id=rid,
                new_token_ids=[request.output_token_ids[-1]],
                logprobs=result.logprobs.get(rid),
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
        )
        return outputs
