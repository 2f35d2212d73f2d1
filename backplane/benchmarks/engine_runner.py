"""Building an offline engine from bench flags and pushing a request set through it."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from backplane.benchmarks.step_timing import StepRecord, StepTimer
from backplane.benchmarks.workload import BenchRequest

logger = logging.getLogger(__name__)

def create_engine(engine_args):
    """An LLMEngine built from ``engine_args`` (a `backplane.config.EngineArgs`)."""
    from backplane.core.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(engine_args)


def engine_dtype(engine) -> str:
    """The dtype name the engine resolved for its weights (e.g. "bfloat16")."""
    return str(engine.config.model_config.torch_dtype).removeprefix("torch.")


def engine_hf_config(engine, model: str):
    """The engine's transformers config (read from disk when the engine does not hold it)."""
    cfg = getattr(getattr(getattr(engine, "config", None), "model_config", None), "hf_config", None)
    if cfg is None:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    return cfg


def kv_cache_tokens(engine) -> int | None:
    """Tokens the engine's KV cache holds (blocks x block size), None if it does not say."""
    try:
        blocks = engine.get_stats().num_total_blocks
        block_size = engine.config.cache_config.block_size
    except AttributeError:
        return None
    return int(blocks) * int(block_size)


@dataclass
class EngineRun:
    """One pass of a request set through the engine."""

    seconds: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    steps: list[StepRecord] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    timing_source: str = "none"
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.seconds

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def sampling_params_for(request: BenchRequest, temperature: float = 0.0,
                        structured_outputs: dict | None = None):
    """Exactly ``output_len`` tokens, EOS ignored (the benchmark's fixed work per request).

    Output is detokenized as usual: detokenization is part of the per-step cost measured.
    ``structured_outputs`` constrains every request (its grammar must not end before
    ``output_len`` tokens, e.g. an unbounded array, so the work stays the same).
    """
    from backplane.sampling_params import SamplingParams

    return SamplingParams(
        temperature=temperature,
        max_tokens=request.output_len,
        min_tokens=request.output_len,
        ignore_eos=True,
        structured_outputs=structured_outputs,
    )


def run_requests(engine, requests: list[BenchRequest], temperature: float = 0.0,
                 progress: bool = False, desc: str = "backplane",
                 instrument: bool = True, structured_outputs: dict | None = None,
                 lora_requests: list | None = None) -> EngineRun:
    """Add all requests at once, step until every one finished; time the whole pass.

    ``lora_requests``: request i runs on adapter ``lora_requests[i % len]``."""
    from tqdm import tqdm

    timer = StepTimer(engine, instrument_model=instrument)
    # Counted in output tokens: requests of a batch finish together, tokens flow every step.
    bar = tqdm(total=sum(r.output_len for r in requests), desc=desc, unit="tok",
               disable=not progress, leave=False)
    output_tokens = 0
    first_token: dict[str, float] = {}
    try:
        start = time.perf_counter()
        for index, req in enumerate(requests):
            engine.add_request(req.request_id, req.prompt_token_ids,
                               sampling_params_for(req, temperature, structured_outputs),
                               **({"lora_request": lora_requests[index % len(lora_requests)]}
                                  if lora_requests else {}))
            timer.add(req.request_id)
        pending = {r.request_id for r in requests}
        while pending:
            outputs = timer.step()
            now = time.perf_counter() - start
            bar.update(timer.records[-1].new_tokens)
            for out in outputs:
                if out.request_id not in first_token and any(c.token_ids for c in out.outputs):
                    first_token[out.request_id] = now
                if out.finished and out.request_id in pending:
                    pending.discard(out.request_id)
                    output_tokens += sum(len(c.token_ids) for c in out.outputs)
            if not outputs and not engine.has_unfinished_requests():
                raise RuntimeError(f"engine stopped with {len(pending)} requests unfinished")
        seconds = time.perf_counter() - start
    finally:
        bar.close()
        timer.close()
    stats: dict[str, Any] = {}
    try:
        raw = engine.get_stats()
        fields = dataclasses.asdict(raw) if dataclasses.is_dataclass(raw) else vars(raw)
        stats = {k: v for k, v in fields.items() if isinstance(v, int | float)}
        if getattr(raw, "spec_decode", None) is not None:
            # Speculative decoding, counted since the engine started.
            stats["spec_acceptance_rate"] = raw.spec_acceptance_rate
            stats["spec_mean_accepted_length"] = raw.spec_mean_accepted_length
    except (AttributeError, TypeError):
        pass
    return EngineRun(
        seconds=seconds,
        num_requests=len(requests),
        prompt_tokens=sum(r.prompt_len for r in requests),
        output_tokens=output_tokens,
        steps=timer.records,
        first_token_s=sorted(first_token.values()),
        timing_source=timer.source,
        stats=stats,
    )


def warm_up(engine, id_low: int, id_high: int, prompt_len: int = 32, output_len: int = 4) -> None:
    """Two short requests first: kernel selection, compilation and page faults stay untimed."""
    import random

    rng = random.Random(1234)
    reqs = [
        BenchRequest(f"warmup-{i}", [rng.randrange(id_low, id_high) for _ in range(prompt_len)],
                     output_len)
        for i in range(2)
    ]
    run_requests(engine, reqs, instrument=False)
