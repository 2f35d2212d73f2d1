"""``use_beam_search: true`` on the completion and chat APIs (vLLM's request fields).

``n`` is the beam width, and the response has the ``n`` best sequences as its
choices, best first. ``max_tokens`` (chat: ``max_completion_tokens``),
``ignore_eos``, ``length_penalty`` and ``include_stop_str_in_output`` carry
over to `BeamSearchParams`; the search itself is `backplane.beam_search`, run
step by step through the AsyncEngine (each step's beams are engine requests
of one token, submitted together). Sampling fields that beam search would
ignore (``temperature`` above 0, ``top_p``, penalties, ``stop``, ...) and
``stream`` are refused with a 400 naming the field rather than ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from backplane.beam_search import (
    BeamSearch,
    StepResult,
    check_beam_width,
    run_beam_search_async,
    step_result,
)
from backplane.core.engine.async_engine import RequestAbortedError
from backplane.entrypoints.openai.errors import (
    ENGINE_ERRORS,
    bad_request,
    engine_error,
    from_value_error,
)
from backplane.entrypoints.openai.serving_common import (
    ClientDisconnected,
    ServingContext,
    abort_all,
    collect_finals,
    iterate_request,
    lora_kwargs,
    run_unless_disconnected,
)
from backplane.lora import LoRARequest
from backplane.outputs import RequestOutput
from backplane.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

# Request fields beam search does not use: each must keep a value that changes
# nothing (its default or neutral one), or the request is a 400 naming it. A field
# a request model does not declare reads as None, which every check takes as neutral.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v is None or v is False,
    "prompt_logprobs": lambda v: v is None,
    "top_p": lambda v: v in (None, 1),
    "top_k": lambda v: v in (None, 0, -1),
    "min_p": lambda v: not v,
    "presence_penalty": lambda v: not v,
    "frequency_penalty": lambda v: not v,
    "repetition_penalty": lambda v: v in (None, 1),
    "logit_bias": lambda v: not v,
    "stop": lambda v: not v,
    "stop_token_ids": lambda v: not v,
    "min_tokens": lambda v: not v,
    "bad_words": lambda v: not v,
    "allowed_token_ids": lambda v: v is None,
    "skip_special_tokens": lambda v: v is not False,
}


def check_beam_search_request(ctx: ServingContext, req) -> None:
    """400 naming the field for what a beam search request cannot combine with."""
    if req.stream:
        raise bad_request(
            "stream is not supported with use_beam_search: the beams are only ranked once "
            "the search ends; send stream: false",
            "stream",
        )
    if req.temperature:
        raise bad_request(
            f"temperature ({req.temperature}) must be 0 or absent with use_beam_search: "
            "beam search ranks candidates by their logprobs, it does not sample",
            "temperature",
        )
    if getattr(req, "max_tokens", None) == 0:
        raise bad_request("max_tokens must be >= 1 with use_beam_search", "max_tokens")
    for name, neutral in _NEUTRAL.items():
        if not neutral(getattr(req, name, None)):
            raise bad_request(
                f"{name} is not supported with use_beam_search; leave it out", name
            )
    try:
        check_beam_width(req.n, ctx.engine.engine.max_logprobs, "n")
    except ValueError as exc:
        raise bad_request(str(exc), "n") from None


async def beam_search_response(
    ctx: ServingContext,
    raw_request: Request,
    req,
    base_id: str,
    prompts: list[list[int]],
    params: list[SamplingParams],
    build: Callable[[list[RequestOutput]], BaseModel],
    lora_request: LoRARequest | None = None,
) -> Response:
    """Run the beam search of each prompt and answer ``build(finals)`` as JSON.

    ``params`` are the request's SamplingParams per prompt (their ``max_tokens``
    already resolved against max_model_len); ``finals`` has one finished
    RequestOutput per prompt whose outputs are its ``n`` best sequences.
    A client that disconnects gets 499 and every engine request is aborted.
    ``lora_request``: the LoRA adapter every step runs with (None: the base model).
    """
    check_beam_search_request(ctx, req)
    try:
        beam_params = [
            BeamSearchParams(
                beam_width=req.n,
                max_tokens=sp.max_tokens,
                ignore_eos=req.ignore_eos,
                length_penalty=req.length_penalty,
                include_stop_str_in_output=req.include_stop_str_in_output,
            )
            for sp in params
        ]
    except ValueError as exc:
        raise from_value_error(exc) from None
    engine = ctx.engine.engine
    search = BeamSearch(
        [(ids, req.cache_salt) for ids in prompts], beam_params, engine.eos_token_ids,
        ctx.tokenizer,
    )
    arrived = time.time()
    if ctx.limits.log_requests:
        logger.info("request %s: beam search of %d prompt(s), %s", base_id, len(prompts),
                    beam_params[0])

    async def step(step_prompts: list, step_params: list[SamplingParams]) -> list[StepResult]:
        return await _engine_step(ctx, base_id, req.priority, step_prompts, step_params,
                                  lora_request)

    async def work() -> list[RequestOutput]:
        await run_beam_search_async(search, step)
        return search.request_outputs(ctx.engine_request_ids(base_id, len(prompts)))

    try:
        finals = await run_unless_disconnected(raw_request, work())
    except ClientDisconnected:
        return Response(status_code=499)
    except ENGINE_ERRORS as exc:
        raise engine_error(exc) from None
    except ValueError as exc:
        raise from_value_error(exc) from None
    for final in finals:  # each prompt's search counts as one request in the metrics
        async for _ in ctx.metrics.track(_just(final), arrived):
            pass
    return JSONResponse(build(finals).model_dump())


async def _just(output: RequestOutput):
    yield output


async def _engine_step(
    ctx: ServingContext,
    base_id: str,
    priority: int,
    prompts: list,
    params: list[SamplingParams],
    lora_request: LoRARequest | None = None,
) -> list[StepResult]:
    """One beam search step: every prompt one engine request, added together, run to the end."""
    request_ids = ctx.engine_request_ids(base_id, len(prompts))
    try:
        added = await asyncio.gather(
            *(
                ctx.engine.add_request(rid, p, sp, priority=priority,
                                       **lora_kwargs(lora_request))
                for rid, p, sp in zip(request_ids, prompts, params, strict=True)
            ),
            return_exceptions=True,
        )
        failed = next((a for a in added if isinstance(a, BaseException)), None)
        if failed is not None:
            raise failed
        finals = await collect_finals([iterate_request(ctx.engine, s) for s in added])
    finally:
        abort_all(ctx, request_ids)  # a no-op for the finished ones
    if any(out.outputs and out.outputs[0].finish_reason == "abort" for out in finals):
        raise RequestAbortedError("a beam search step was aborted by the engine")
    return [step_result(out) for out in finals]
