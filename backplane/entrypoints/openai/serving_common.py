"""What the completion and chat handlers share: model check, prompt limits,
SamplingParams from a request, logprob text, SSE framing, disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse

from backplane.core.engine.async_engine import AsyncEngine, RequestAbortedError, RequestStream
from backplane.core.structured_outputs import StructuredOutputError, StructuredOutputsParams
from backplane.entrypoints.openai.errors import (
    ENGINE_ERRORS,
    OpenAIServingError,
    bad_request,
    engine_error,
    from_value_error,
)
from backplane.entrypoints.openai.metrics import ServerMetrics
from backplane.entrypoints.openai.prompt_processing import PromptProcessor
from backplane.entrypoints.openai.protocol import UsageInfo
from backplane.entrypoints.openai.serving_lora import LoRAAdapters
from backplane.lora import LoRARequest
from backplane.outputs import Logprob, RequestOutput
from backplane.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How often a non-streaming handler checks whether its client is still there.
DISCONNECT_POLL_S = 0.2
# JSON has no -inf; a token with probability 0 is reported with this logprob.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds and trust settings of the server (`backplane serve` flags).

    Attributes:
        max_n: most completions (``n``) one request may ask for.
        max_sequences_per_request: most sequences (prompts x n) one request may start.
        trust_request_chat_template: render ``chat_template`` sent in a request
            (off by default: templates are code).
        chat_template_timeout_s: longest any chat template may render.
        response_role: the role of generated chat messages.
        stream_interval: a stream sends a chunk every this many tokens (and at the end).
        log_requests: log each request's ids, prompt length and sampling parameters.
        enable_auto_tool_choice: parse tool calls out of chat replies (``tool_choice``
            ``auto``) with ``tool_call_parser``.
        tool_call_parser: the `TOOL_PARSERS` name of the model's tool-call format.
        reasoning_parser: the `REASONING_PARSERS` name splitting off ``reasoning_content``.
    """

    max_n: int = 128
    max_sequences_per_request: int = 1024
    trust_request_chat_template: bool = False
    chat_template_timeout_s: float = 2.0
    response_role: str = "assistant"
    stream_interval: int = 1
    log_requests: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    @classmethod
    def from_options(cls, opts) -> ServerLimits:
        """The limits of a `ServerOptions`."""
        return cls(
            max_n=opts.max_n,
            max_sequences_per_request=opts.max_sequences_per_request,
            trust_request_chat_template=opts.trust_request_chat_template,
            chat_template_timeout_s=opts.chat_template_timeout,
            response_role=opts.response_role,
            stream_interval=opts.stream_interval,
            log_requests=opts.enable_log_requests,
            enable_auto_tool_choice=opts.enable_auto_tool_choice,
            tool_call_parser=opts.tool_call_parser,
            reasoning_parser=opts.reasoning_parser,
        )


@dataclass
class ServingContext:
    """Everything a handler needs about the server and its engine."""

    engine: AsyncEngine
    served_model_names: list[str]
    metrics: ServerMetrics
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    limits: ServerLimits = field(default_factory=ServerLimits)
    # The LoRA adapters served by name (--lora-modules, /v1/load_lora_adapter).
    loras: LoRAAdapters | None = None

    def __post_init__(self) -> None:
        self.prompts = PromptProcessor(
            self.engine.tokenizer, self.max_model_len, self.limits.chat_template_timeout_s
        )
        if self.loras is None:
            self.loras = LoRAAdapters(self.engine, self.served_model_names)

    @property
    def model_name(self) -> str:
        """The name responses report (the first served name)."""
        return self.served_model_names[0]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return self.engine.config.model_spec.vocab_size

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's generation defaults (SamplingParams names) for unset request fields."""
        return self.engine.config.model_spec.sampling_defaults

    def requested_max_tokens(self, req, name: str) -> int | None:
        """``req.<name>``, or None (the model's default) when the client left it unset.

        A protocol default (16 for completions) applies only when the model sets no
        ``max_new_tokens``.
        """
        if client_sets(req, name) or "max_tokens" not in self.sampling_defaults:
            return getattr(req, name)
        return None

    def check_model(self, name: str | None) -> LoRARequest | None:
        """404 unless ``name`` is a served name or a LoRA adapter (None means the default).

        Returns the adapter's `LoRARequest` (None for the base model), looked up
        once, so that an adapter unloaded meanwhile cannot turn into the base model.
        """
        if name is None or name in self.served_model_names:
            return None
        lora = self.loras.get(name)
        if lora is None:
            served = [*self.served_model_names, *(a.lora_name for a in self.loras.all())]
            raise OpenAIServingError(
                f"The model `{name}` does not exist; this server serves "
                f"{', '.join(repr(n) for n in served)}",
                HTTPStatus.NOT_FOUND,
                param="model",
                code="model_not_found",
            )
        return lora

    def check_base_model(self, name: str | None, endpoint: str) -> None:
        """`check_model`, and a 400 for a LoRA adapter (``endpoint`` runs the base model only)."""
        if self.check_model(name) is not None:
            raise bad_request(
                f"{endpoint} runs the base model only; the LoRA adapter {name!r} serves the "
                "generation endpoints", "model")

    def lora_request_for(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base model); 404 if unknown."""
        return self.check_model(name)

    def response_model(self, name: str | None) -> str:
        """The ``model`` a response reports: the adapter's name, else the first served name."""
        if name is None or name in self.served_model_names:
            return self.model_name
        return name

    def check_n(self, n: int, num_prompts: int = 1) -> None:
        """400 if ``n`` (times the number of prompts) exceeds the server's limits."""
        limits = self.limits
        if n > limits.max_n:
            raise bad_request(
                f"n ({n}) exceeds this server's limit of {limits.max_n} completions per "
                "request (--max-n)",
                "n",
            )
        if n * num_prompts > limits.max_sequences_per_request:
            raise bad_request(
                f"n ({n}) x {num_prompts} prompts = {n * num_prompts} sequences exceeds this "
                f"server's limit of {limits.max_sequences_per_request} per request "
                "(--max-sequences-per-request); split the request",
                "prompt",
            )

    def check_priority(self, priority: int) -> None:
        """400 for a non-zero ``priority`` unless the scheduler orders by priority."""
        policy = self.engine.config.scheduler_config.scheduling_policy
        if priority and policy != "priority":
            raise bad_request(
                f"priority ({priority}) has no effect under the {policy!r} scheduling policy; "
                "start the server with --scheduling-policy priority or leave it out",
                "priority",
            )

    def chat_template_for(self, requested: str | None, kwargs: dict | None) -> str | None:
        """The template to render with: the server's, or the request's if trusted."""
        if kwargs and "chat_template" in kwargs:
            requested = requested or kwargs.pop("chat_template")
        if requested is None:
            return self.chat_template
        if not self.limits.trust_request_chat_template:
            raise bad_request(
                "chat_template in a request is refused: templates are code, and this server "
                "was not started with --trust-request-chat-template",
                "chat_template",
            )
        return requested

    def truncation(self, truncate_prompt_tokens: int | None, max_tokens: int | None) -> int | None:
        """How many prompt tokens to keep (truncate_prompt_tokens), or None for all.

        -1 keeps as many as leave room for ``max_tokens`` (or one token).
        """
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1:
            return max(1, self.max_model_len - max(max_tokens or 1, 1))
        if truncate_prompt_tokens < 1:
            raise bad_request(
                f"truncate_prompt_tokens must be -1 or >= 1, got {truncate_prompt_tokens}",
                "truncate_prompt_tokens",
            )
        return truncate_prompt_tokens

    def engine_request_ids(self, display_id: str, count: int) -> list[str]:
        """Unique engine ids for ``count`` requests of one response shown as ``display_id``.

        A client-chosen id is only shown back: the engine ids get a random part,
        so two clients using the same id can never touch each other's requests.
        """
        unique = uuid.uuid4().hex[:16]
        return [f"{display_id}-{unique}-{i}" for i in range(count)]

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """400 if any token id is outside the vocabulary."""
        vocab = self.vocab_size
        for tid in ids:
            if tid < 0 or tid >= vocab:
                raise bad_request(
                    f"{param} contains token id {tid}, outside the vocabulary [0, {vocab})", param
                )

    def resolve_max_tokens(
        self, prompt_len: int, requested: int | None, param: str, prompt_param: str
    ) -> int:
        """The number of tokens to generate, checked against max_model_len.

        ``None`` means the model's default max_tokens (its ``max_new_tokens``) if it
        has one, else "as many as fit" (max_model_len - prompt length); a default
        is capped to fit rather than refused.
        """
        limit = self.max_model_len
        if requested is not None and requested < 1:
            raise bad_request(f"{param} must be >= 1, got {requested}", param)
        if prompt_len >= limit:
            raise bad_request(
                f"prompt ({prompt_len} tokens) is too long: max_model_len is {limit} and at "
                "least 1 token must be left to generate; shorten the prompt",
                prompt_param,
            )
        if requested is None:
            default = self.sampling_defaults.get("max_tokens")
            return limit - prompt_len if default is None else min(default, limit - prompt_len)
        if prompt_len + requested > limit:
            raise bad_request(
                f"{param} ({requested}) + prompt ({prompt_len} tokens) = "
                f"{prompt_len + requested} exceeds max_model_len ({limit}); lower {param} "
                "or shorten the prompt",
                param,
            )
        return requested


def build_sampling_params(
    req,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    defaults: dict[str, Any] | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """SamplingParams from a completion/chat request; 400 naming the field if invalid.

    ``defaults`` (`ServingContext.sampling_defaults`) fill the sampling fields
    the client left unset. ``structured_outputs`` is the request's constraint
    (`structured_outputs.request_constraint`, or a forced tool call's schema).
    """
    # Upper bounds (--max-logprobs) are the engine's to check; it names the field.
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids (integers as strings), got "
                f"{list(req.logit_bias)[:5]}",
                "logit_bias",
            ) from None
    kwargs: dict[str, Any] = dict(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logit_bias=bias,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words,
        structured_outputs=structured_outputs,
    )
    return sampling_params_with(
        req,
        (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ),
        defaults=defaults,
        **kwargs,
    )


def client_sets(req, name: str) -> bool:
    """Whether the client sent ``name`` with a value (not omitted, not null)."""
    if getattr(req, name, None) is None:
        return False
    fields_set = getattr(req, "model_fields_set", None)
    return fields_set is None or name in fields_set


def sampling_params_with(
    req, names: tuple[str, ...], defaults: dict[str, Any] | None = None, **kwargs: Any
) -> SamplingParams:
    """``SamplingParams(**kwargs)`` plus the fields of ``names``.

    A field the client set wins; one it left unset takes ``defaults``' value
    (the model's generation defaults) when there is one, else the request's
    own default (not None) or SamplingParams'. An invalid value is a 400
    naming the field.
    """
    defaults = defaults or {}
    for name in names:
        value = getattr(req, name)
        if client_sets(req, name):
            kwargs[name] = value
        elif name in defaults:
            kwargs[name] = defaults[name]
        elif value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise from_value_error(exc) from None


def display_id(req, raw_request: Request) -> str | None:
    """The id to show for a response: the body's ``request_id``, else ``X-Request-Id``.

    Only shown: engine ids are made unique separately (`engine_request_ids`).
    """
    return getattr(req, "request_id", None) or raw_request.headers.get("x-request-id") or None


def check_request_options(ctx: ServingContext, req) -> None:
    """400s for option combinations the completion and chat APIs refuse."""
    ctx.check_priority(req.priority)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")


def usage_options(req) -> tuple[bool, bool]:
    """(usage in a final chunk, usage in every chunk) of a streaming request."""
    opts = req.stream_options
    if opts is None:
        return False, False
    return opts.include_usage, opts.include_usage and opts.continuous_usage_stats


def engine_prompt(token_ids: list[int], cache_salt: str | None):
    """What `AsyncEngine.add_request` takes: the ids, with the request's cache salt if any."""
    if cache_salt is None:
        return token_ids
    return {"prompt_token_ids": token_ids, "cache_salt": cache_salt}


def prompt_logprobs_json(entries) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's JSON shape of prompt logprobs: {token_id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [
        None
        if entry is None
        else {
            str(tid): {
                "logprob": max(lp.logprob, MIN_LOGPROB),
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for tid, lp in entry.items()
        }
        for entry in entries
    ]


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    """Token usage summed over the final outputs of a response's requests."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


# ----- logprobs -----


def token_text(tokenizer, token_id: int, logprob: Logprob | None, as_id: bool = False) -> str:
    """The text of one token, as shown in logprobs (``token_id:N`` with ``as_id``)."""
    if as_id:
        return f"token_id:{token_id}"
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def chosen_logprob(entry: dict[int, Logprob] | None, token_id: int) -> float | None:
    """The logprob of the sampled token at one position (None if not reported)."""
    if not entry or token_id not in entry:
        return None
    return max(entry[token_id].logprob, MIN_LOGPROB)


def ranked(entry: dict[int, Logprob] | None, limit: int) -> list[tuple[int, Logprob]]:
    """The ``limit`` most likely tokens of one position, best first."""
    if not entry:
        return []
    items = sorted(entry.items(), key=lambda kv: -kv[1].logprob)
    return items[:limit]


# ----- async plumbing -----


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


async def run_unless_disconnected(raw_request: Request, work: Awaitable):
    """Await ``work``, but cancel it (aborting its requests) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await raw_request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task in done:
        return task.result()
    raise ClientDisconnected()


async def iterate_request(engine: AsyncEngine, stream: RequestStream) -> AsyncIterator:
    """Iterate a RequestStream, aborting the request if the consumer stops early."""
    try:
        async for output in stream:
            yield output
    finally:
        if not stream.finished:
            engine.abort_nowait(stream.request_id)


def every_n_tokens(
    outputs: AsyncIterator[RequestOutput], interval: int
) -> AsyncIterator[RequestOutput]:
    """Pass on an output only once ``interval`` more tokens arrived, and the final one.

    Outputs are cumulative, so skipping some loses nothing: the next one sent
    carries their tokens too (``--stream-interval``). With interval 1 the
    iterator is returned as it is (no extra layer per output).
    """
    return outputs if interval <= 1 else _thinned(outputs, interval)


async def _thinned(
    outputs: AsyncIterator[RequestOutput], interval: int
) -> AsyncIterator[RequestOutput]:
    sent = 0
    async with contextlib.aclosing(outputs) as source:
        async for out in source:
            produced = sum(len(c.token_ids) for c in out.outputs)
            if out.finished or produced - sent >= interval:
                sent = produced
                yield out


async def merge_streams(
    iterators: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several output streams as ``(index, output)`` in arrival order.

    Closing the merged iterator closes every source (so their requests are aborted).
    """
    if len(iterators) == 1:
        async with contextlib.aclosing(iterators[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(it) as source:
                async for item in source:
                    await queue.put((i, item))
            await queue.put((i, done))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # hand the error to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def add_requests(
    ctx: ServingContext,
    request_ids: list[str],
    prompts: list,
    params: list,
    priority: int = 0,
    constraint_param: str | None = None,
    lora_request: LoRARequest | None = None,
) -> list[RequestStream]:
    """Add one engine request per prompt (generation or pooling); their streams, in order.

    ``lora_request``: the LoRA adapter every request runs with (None: the base model).

    If any is refused, the ones already added are aborted and the error is
    raised (ValueError becomes a 400, an engine error a 503/500). A structured-output
    spec the engine refuses is a 400 naming ``constraint_param``, the request field
    that set the constraint.
    """
    streams: list[RequestStream] = []
    added: list[str] = []
    try:
        for rid, prompt, sp in zip(request_ids, prompts, params, strict=True):
            streams.append(await ctx.engine.add_request(
                rid, prompt, sp, priority=priority, **lora_kwargs(lora_request)))
            added.append(rid)
            if ctx.limits.log_requests:
                ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
                logger.info("request %s: %d prompt tokens, priority %d, %s%s",
                            rid, len(ids), priority, sp,
                            "" if lora_request is None
                            else f", LoRA adapter {lora_request.lora_name!r}")
    except BaseException as exc:
        # Only what this call added: an id refused as a duplicate belongs to someone else.
        abort_all(ctx, added)
        if isinstance(exc, ValueError):
            err = from_value_error(exc)
            constrained = constraint_param is not None and (
                isinstance(exc, StructuredOutputError) or err.param is None)
            if constrained:
                err.param = constraint_param
                if not err.message.startswith(constraint_param):
                    err.message = f"{constraint_param}: {err.message}"
            raise err from None
        if isinstance(exc, ENGINE_ERRORS):
            raise engine_error(exc) from None
        raise
    return streams


async def submit_all(
    ctx: ServingContext,
    request_ids: list[str],
    prompts: list,
    params: list[SamplingParams],
    priority: int,
    constraint_param: str | None = None,
    lora_request: LoRARequest | None = None,
) -> list[AsyncIterator[RequestOutput]]:
    """`add_requests`, then metered output iterators in the same order."""
    arrived = time.time()
    streams = await add_requests(ctx, request_ids, prompts, params, priority, constraint_param,
                                 lora_request)
    return [
        every_n_tokens(
            ctx.metrics.track(iterate_request(ctx.engine, stream), arrived),
            ctx.limits.stream_interval,
        )
        for stream in streams
    ]


def lora_kwargs(lora_request: LoRARequest | None) -> dict[str, Any]:
    """``lora_request=`` for `AsyncEngine.add_request`, left out for the base model (so that
    engines without LoRA support, such as test doubles, keep working)."""
    return {} if lora_request is None else {"lora_request": lora_request}


def abort_all(ctx: ServingContext, request_ids: list[str]) -> None:
    """Abort every request still running among ``request_ids`` (finished ones are skipped)."""
    for rid in request_ids:
        ctx.engine.abort_nowait(rid)


async def collect_finals(iterators: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The final output of each request, in submission order."""
    finals: list[RequestOutput | None] = [None] * len(iterators)
    merged = merge_streams(iterators)
    async with contextlib.aclosing(merged):
        async for i, out in merged:
            finals[i] = out
    missing = [i for i, f in enumerate(finals) if f is None or not f.finished]
    if missing:
        raise RequestAbortedError(f"request(s) {missing} ended without a final output")
    return finals  # type: ignore[return-value]


async def finals_unless_disconnected(
    ctx: ServingContext,
    raw_request: Request,
    request_ids: list[str],
    iterators: list[AsyncIterator[RequestOutput]],
) -> list[RequestOutput] | None:
    """The final outputs of a non-streaming response, or None if the client went away.

    Whatever happens, the requests are aborted afterwards (a no-op for finished
    ones); an engine failure becomes ``engine_error``'s 500 or 503.
    """
    try:
        return await run_unless_disconnected(raw_request, collect_finals(iterators))
    except ClientDisconnected:
        return None
    except ENGINE_ERRORS as exc:
        raise engine_error(exc) from None
    finally:
        abort_all(ctx, request_ids)


# SSE breaks lines only at CR and LF, but readers that split like str.splitlines()
# (httpx's iter_lines, for one) also break at these; in JSON text they can only
# stand inside strings, where the escape means the same character.
_SPLITLINES_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line_json(data: str) -> str:
    """JSON text ``data`` with the line separators str.splitlines() knows escaped."""
    return data.translate(_SPLITLINES_BREAKS)


def sse(payload: dict | str) -> str:
    """One Server-Sent Event line pair."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {one_line_json(data)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that notices client disconnects promptly.

    It listens for the disconnect while streaming (whatever ASGI version the
    server speaks), always closes the body generator, and then calls
    ``on_close`` (which aborts the response's engine requests; a no-op for
    requests that finished), even if the body was never iterated.
    """

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None
    ) -> None:
        super().__init__(
            content,
            media_type=self.media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # client gone mid-write
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            if self._on_close is not None:
                self._on_close()


def error_event(err: OpenAIServingError) -> str:
    """An SSE event carrying an error (once a stream has started, the status is sent)."""
    return sse(err.body())
