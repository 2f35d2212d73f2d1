"""``POST /v1/responses``: OpenAI's Responses API, text only.

The conversation (``instructions`` as a system message, then ``input``) is
rendered by the same chat template code as ``/v1/chat/completions`` and runs
as one engine request. Non-streaming answers one ``response`` object;
streaming sends OpenAI's typed Server-Sent Events (``event: <type>`` and
``data: {...}``, each with a ``sequence_number``)::

    response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta (repeated),
    response.output_text.done, response.content_part.done,
    response.output_item.done, then response.completed (or response.incomplete)

Responses are not stored, so ``previous_response_id``, ``store: true`` and
``background`` are refused, as is every other field this server does not
implement (tools, reasoning, structured ``text.format``, ...): a 400 names it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from backplane.core.engine.async_engine import RequestAbortedError
from backplane.entrypoints.openai.errors import (
    ENGINE_ERRORS,
    OpenAIServingError,
    bad_request,
    engine_error,
)
from backplane.entrypoints.openai.protocol import ChatMessage
from backplane.entrypoints.openai.protocol_responses import (
    IncompleteDetails,
    InputTokensDetails,
    ResponseContentPartEvent,
    ResponseError,
    ResponseErrorEvent,
    ResponseLifecycleEvent,
    ResponseOutputItemEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponsesResponse,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
    response_item_id,
)
from backplane.entrypoints.openai.serving_common import (
    ServingContext,
    SSEResponse,
    abort_all,
    display_id,
    finals_unless_disconnected,
    merge_streams,
    one_line_json,
    sampling_params_with,
    submit_all,
)
from backplane.outputs import RequestOutput
from backplane.sampling_params import SamplingParams

# Fields accepted only with a value that asks for nothing beyond plain text
# generation (None values inside a dict count as absent), and why others are refused.
_NEUTRAL: dict[str, tuple[tuple, str]] = {
    "store": ((None, False), "responses are not kept; send store: false or omit it"),
    "background": ((None, False), "background responses need stored responses"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "auto", "none"), "tool calling is not supported"),
    "include": ((None, []), "no extra output data is available"),
    "truncation": ((None, "disabled"), "a conversation too long for the model is refused"),
    "text": ((None, {}, {"format": {"type": "text"}}), "text.format must be plain text"),
    "stream_options": ((None, {}, {"include_obfuscation": False}), "deltas are not obfuscated"),
}
# Why some OpenAI fields without a neutral value are refused (others: "not supported").
_WHY = {
    "previous_response_id": "responses are not stored; send the whole conversation in input",
    "conversation": "conversations are not stored; send the whole conversation in input",
    "reasoning": "no reasoning parser",
    "prompt": "prompt templates are not stored",
    "top_logprobs": "logprobs are not available from /v1/responses",
}
# Responses roles -> chat template roles (OpenAI treats developer like system).
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_ITEM_KEYS = {"type", "role", "content", "id", "status"}
_PART_TYPES = {"input_text", "output_text"}
_PART_KEYS = {"type", "text", "annotations", "logprobs"}
# OpenAI's limits on metadata.
_METADATA_PAIRS, _METADATA_KEY_LEN, _METADATA_VALUE_LEN = 16, 64, 512


def check_supported(req: ResponsesRequest) -> None:
    """400 naming the first field that asks for something this server does not do."""
    for name, value in (req.model_extra or {}).items():
        if value is not None:
            why = _WHY.get(name, "not implemented by this server")
            raise bad_request(f"{name} is not supported by /v1/responses ({why})", name)
    for name, (allowed, why) in _NEUTRAL.items():
        value = getattr(req, name)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        if value not in allowed:
            raise bad_request(f"{name}={value!r} is not supported ({why})", name)
    if req.metadata is not None:
        too_long = [
            k
            for k, v in req.metadata.items()
            if len(k) > _METADATA_KEY_LEN or len(v) > _METADATA_VALUE_LEN
        ]
        if len(req.metadata) > _METADATA_PAIRS or too_long:
            raise bad_request(
                f"metadata takes at most {_METADATA_PAIRS} pairs, keys of at most "
                f"{_METADATA_KEY_LEN} and values of at most {_METADATA_VALUE_LEN} characters",
                "metadata",
            )


def conversation(req: ResponsesRequest) -> list[ChatMessage]:
    """The chat messages of a request: ``instructions`` (as system), then ``input``."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    if isinstance(req.input, str):
        return [*messages, ChatMessage(role="user", content=req.input)]
    if not req.input:
        raise bad_request("input must be a string or a non-empty list of messages", "input")
    return messages + [_input_message(item, i) for i, item in enumerate(req.input)]


def _input_message(item: dict, index: int) -> ChatMessage:
    where = f"input[{index}]"
    kind = item.get("type", "message")
    if kind != "message":
        raise bad_request(
            f"{where}: items of type {kind!r} are not supported; only messages (text)", "input"
        )
    unknown = sorted(set(item) - _ITEM_KEYS)
    if unknown:
        raise bad_request(f"{where}: unsupported field(s) {unknown}", "input")
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", "input")
    content = item.get("content")
    if isinstance(content, str):
        return ChatMessage(role=_ROLES[role], content=content)
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of text parts", "input")
    parts = []
    for j, part in enumerate(content):
        ok = (
            isinstance(part, dict)
            and part.get("type") in _PART_TYPES
            and isinstance(part.get("text"), str)
            and set(part) <= _PART_KEYS
        )
        if not ok:
            got = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(
                f"{where}.content[{j}]: only input_text and output_text parts "
                f"({{'type', 'text'}}) are supported, got {got!r}",
                "input",
            )
        parts.append({"type": "text", "text": part["text"]})
    # The chat code joins text parts exactly as it does for chat messages.
    return ChatMessage(role=_ROLES[role], content=parts)


class _Events:
    """Frames stream events as SSE, numbering them in the order they are sent."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, event) -> str:
        event.sequence_number = self.next
        self.next += 1
        return f"event: {event.type}\ndata: {one_line_json(event.model_dump_json())}\n\n"


class ResponsesServing:
    """Handler of the Responses API."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ResponsesRequest, raw_request: Request) -> Response:
        """Validate, render, submit and answer (JSON or SSE)."""
        ctx = self.ctx
        lora = ctx.check_model(req.model)
        check_supported(req)
        ctx.check_priority(req.priority)
        try:  # the chat endpoint's rendering: off the event loop, under its deadline
            _, prompt_ids = await ctx.prompts.render_chat(
                conversation(req), chat_template=ctx.chat_template
            )
        except OpenAIServingError as err:
            if err.param == "messages":  # this API calls the conversation "input"
                err.param = "input"
            raise
        max_tokens = ctx.resolve_max_tokens(
            len(prompt_ids), req.max_output_tokens, "max_output_tokens", "input"
        )
        # The model's generation defaults fill what the client leaves unset (and
        # what this API has no field for).
        defaults = ctx.sampling_defaults
        unexposed = {k: defaults[k] for k in ("top_k", "min_p", "repetition_penalty")
                     if k in defaults}
        params = sampling_params_with(
            req, ("temperature", "top_p"), defaults, max_tokens=max_tokens, **unexposed
        )
        shown_id = display_id(req, raw_request) or response_item_id("resp")
        base = self._in_progress(req, shown_id, params)
        request_ids = ctx.engine_request_ids(base.id, 1)
        iterators = await submit_all(ctx, request_ids, [prompt_ids], [params], req.priority,
                                     lora_request=lora)
        if req.stream:
            return SSEResponse(
                self._stream(base, iterators), on_close=lambda: abort_all(ctx, request_ids)
            )
        finals = await finals_unless_disconnected(ctx, raw_request, request_ids, iterators)
        if finals is None:
            return Response(status_code=499)
        done = self._finished(base, finals[0], response_item_id("msg"))
        return JSONResponse(done.model_dump(mode="json"))

    def _in_progress(
        self, req: ResponsesRequest, response_id: str, params: SamplingParams
    ) -> ResponsesResponse:
        """The response object before any output, echoing the request."""
        return ResponsesResponse(
            id=response_id,
            status="in_progress",
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            metadata=req.metadata or {},
            model=self.ctx.response_model(req.model),
            parallel_tool_calls=req.parallel_tool_calls is not False,  # OpenAI's default: true
            temperature=params.temperature,
            top_p=params.top_p,
            tool_choice=req.tool_choice or "auto",
            user=req.user,
            safety_identifier=req.safety_identifier,
        )

    @staticmethod
    def _finished(base: ResponsesResponse, final: RequestOutput, item_id: str) -> ResponsesResponse:
        """The final response object: the assistant message, status and usage."""
        comp = final.outputs[0]
        status, details = "completed", None
        if comp.finish_reason == "length":
            status, details = "incomplete", IncompleteDetails(reason="max_output_tokens")
        elif comp.finish_reason == "abort":  # the server stopped it (shutdown)
            status = "cancelled"
        message = ResponseOutputMessage(
            id=item_id,
            status="completed" if status == "completed" else "incomplete",
            content=[ResponseOutputText(text=comp.text)],
        )
        prompt, generated = len(final.prompt_token_ids), len(comp.token_ids)
        usage = ResponseUsage(
            input_tokens=prompt,
            input_tokens_details=InputTokensDetails(cached_tokens=final.num_cached_tokens),
            output_tokens=generated,
            total_tokens=prompt + generated,
        )
        return base.model_copy(
            update={
                "status": status,
                "incomplete_details": details,
                "output": [message],
                "usage": usage,
                "completed_at": int(time.time()) if status == "completed" else None,
            }
        )

    async def _stream(
        self, base: ResponsesResponse, iterators: list[AsyncIterator[RequestOutput]]
    ) -> AsyncIterator[str]:
        emit = _Events()
        item_id = response_item_id("msg")
        yield emit(ResponseLifecycleEvent(type="response.created", response=base))
        yield emit(ResponseLifecycleEvent(type="response.in_progress", response=base))
        yield emit(
            ResponseOutputItemEvent(
                type="response.output_item.added",
                item=ResponseOutputMessage(id=item_id, status="in_progress"),
            )
        )
        yield emit(
            ResponseContentPartEvent(
                type="response.content_part.added",
                item_id=item_id,
                part=ResponseOutputText(text=""),
            )
        )
        sent = 0
        final: RequestOutput | None = None
        try:
            async with contextlib.aclosing(merge_streams(iterators)) as merged:
                async for _, out in merged:
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield emit(ResponseTextDeltaEvent(item_id=item_id, delta=text[sent:]))
                        sent = len(text)
                    if out.finished:
                        final = out
            if final is None:
                raise RequestAbortedError("the request ended without a final output")
        except ENGINE_ERRORS as exc:
            err = engine_error(exc)
            yield emit(ResponseErrorEvent(code=err.code, message=err.message))
            failed = base.model_copy(
                update={
                    "status": "failed",
                    "error": ResponseError(code=err.code, message=err.message),
                }
            )
            yield emit(ResponseLifecycleEvent(type="response.failed", response=failed))
            return
        done = self._finished(base, final, item_id)
        message = done.output[0]
        part = message.content[0]
        yield emit(ResponseTextDoneEvent(item_id=item_id, text=part.text))
        yield emit(
            ResponseContentPartEvent(type="response.content_part.done", item_id=item_id, part=part)
        )
        yield emit(ResponseOutputItemEvent(type="response.output_item.done", item=message))
        terminal = "response.completed" if done.status == "completed" else "response.incomplete"
        yield emit(ResponseLifecycleEvent(type=terminal, response=done))
