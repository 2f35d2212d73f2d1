"""``POST /v1/chat/completions``: messages rendered by the chat template, replies out.

Tool calling and reasoning (docs/tool_calling.md): ``tools`` go to the chat
template; with ``tool_choice`` ``auto`` (the default when tools are given) on a
server started with ``--enable-auto-tool-choice --tool-call-parser NAME``, the
calls the model writes are parsed into ``tool_calls``. ``--reasoning-parser
NAME`` splits every reply into ``reasoning_content`` and ``content``; tool calls
are looked for in the content only. Each choice has its own parser instances.
``tool_choice`` ``"required"`` and a named function need no flag: structured
outputs constrain the reply to the calls (`_ForcedCalls`). ``response_format``,
``structured_outputs`` and the legacy ``guided_*`` fields constrain the reply
(entrypoints/openai/structured_outputs.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from backplane.core.structured_outputs import StructuredOutputsParams
from backplane.entrypoints.openai.errors import (
    ENGINE_ERRORS,
    OpenAIServingError,
    bad_request,
    engine_error,
)
from backplane.entrypoints.openai.prompt_processing import render_chat_prompt
from backplane.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseToolCall,
    TopLogprob,
    UsageInfo,
    random_id,
)
from backplane.entrypoints.openai.reasoning_parsers import ReasoningParser, get_reasoning_parser
from backplane.entrypoints.openai.serving_beam_search import beam_search_response
from backplane.entrypoints.openai.serving_common import (
    MIN_LOGPROB,
    SSE_DONE,
    ServingContext,
    SSEResponse,
    abort_all,
    build_sampling_params,
    check_request_options,
    chosen_logprob,
    display_id,
    engine_prompt,
    error_event,
    finals_unless_disconnected,
    merge_streams,
    prompt_logprobs_json,
    ranked,
    sse,
    submit_all,
    token_text,
    usage_of,
    usage_options,
)
from backplane.entrypoints.openai.structured_outputs import (
    RequestConstraint,
    forced_tool_schema,
    parse_required_calls,
    request_constraint,
)
from backplane.entrypoints.openai.tool_parsers import DeltaMessage as ParserDelta
from backplane.entrypoints.openai.tool_parsers import ToolParser, get_tool_parser
from backplane.entrypoints.openai.tool_parsers.base import random_call_id
from backplane.entrypoints.openai.tool_parsers.forced_array import ForcedCallArrayStream
from backplane.outputs import RequestOutput

__all__ = ["ChatServing", "render_chat_prompt", "tool_choice_mode"]

def tool_choice_mode(req: ChatCompletionRequest, limits) -> str:
    """``"auto"`` (parse the model's tool calls), ``"none"``, or ``"required"`` /
    ``"named"`` (the output is constrained to tool calls); 400 for what is refused.

    As in vLLM: ``tool_choice`` defaults to ``"auto"`` when ``tools`` are given,
    and ``"auto"`` needs a server started with --enable-auto-tool-choice and
    --tool-call-parser. ``"auto"`` without tools has nothing to call: same as "none".
    ``"required"`` and a named function need no flag: structured outputs force the
    calls (`structured_outputs.forced_tool_schema`).
    """
    if req.tool_choice == "required":
        return "required"
    if isinstance(req.tool_choice, NamedToolChoice):
        return "named"
    choice = req.tool_choice or ("auto" if req.tools else "none")
    if choice != "auto" or not req.tools:
        return "none"
    if not (limits.enable_auto_tool_choice and limits.tool_call_parser):
        implied = "" if req.tool_choice else (
            ' (tools without tool_choice mean tool_choice "auto"; send tool_choice "none" to '
            "only show the tools to the chat template)"
        )
        raise bad_request(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
            f"be set{implied}",
            "tool_choice",
        )
    return "auto"


def _tool_call_deltas(delta: ParserDelta | None) -> list[DeltaToolCall]:
    if delta is None:
        return []
    return [DeltaToolCall.model_validate(c.model_dump()) for c in delta.tool_calls]


class _ChoiceParsers:
    """The reasoning and tool-call parsers of ONE choice (their streaming state).

    Text goes through the reasoning parser first (if any); what it calls
    content then goes through the tool parser (if any).
    """

    def __init__(
        self, reasoning: type[ReasoningParser] | None, tools: type[ToolParser] | None
    ) -> None:
        self.reasoner = reasoning() if reasoning is not None else None
        self.tools = tools() if tools is not None else None
        self.text = ""  # raw text fed so far
        self.content = ""  # content fed to the tool parser so far
        self.called = False  # whether any tool call was found

    # ---- whole output ----

    def parse(self, text: str) -> tuple[str | None, str | None, list[ResponseToolCall] | None]:
        """``(reasoning_content, content, tool_calls)`` of a complete output."""
        reasoning, content = None, text
        if self.reasoner is not None:
            reasoning, content = self.reasoner.extract(text)
        calls = None
        if self.tools is not None and content:
            found = self.tools.extract(content)
            if found.tools_called:
                self.called = True
                calls = [ResponseToolCall.model_validate(c.model_dump()) for c in found.tool_calls]
                content = found.content
        return reasoning, content, calls

    # ---- streaming ----

    def feed(self, delta: str) -> tuple[str | None, str | None, list[DeltaToolCall]]:
        """What to send for the next piece of raw output."""
        reasoning, content = None, delta
        if self.reasoner is not None:
            reasoning, content = self.reasoner.extract_streaming(self.text, delta)
        self.text += delta
        content, calls = self._content(content)
        return reasoning, content, calls

    def finish(self) -> tuple[str | None, str | None, list[DeltaToolCall]]:
        """What the parsers held back; call once, at the end of the output."""
        reasoning, content = None, None
        if self.reasoner is not None:
            reasoning, content = self.reasoner.finish()
        content, calls = self._content(content)
        if self.tools is not None:
            end = self.tools.finish()
            content = _join(content, end.content if end else None)
            calls += self._note(_tool_call_deltas(end))
        return reasoning, content, calls

    def _content(self, content: str | None) -> tuple[str | None, list[DeltaToolCall]]:
        if self.tools is None or not content:
            return content, []
        out = self.tools.extract_streaming(self.content, content)
        self.content += content
        return (out.content if out else None), self._note(_tool_call_deltas(out))

    def _note(self, calls: list[DeltaToolCall]) -> list[DeltaToolCall]:
        self.called = self.called or bool(calls)
        return calls


class _ForcedCalls:
    """tool_choice "required" or a named function: the constrained output is the calls.

    Named: the output is the arguments object; it streams as argument fragments of
    one call (id and name on its first piece). Required: the output is a JSON array
    of ``{"name", "parameters"}``; it streams as it grows (`ForcedCallArrayStream`):
    each call's id and name once the name is complete, then its parameters as
    argument fragments. Non-streaming, an output that is not a complete array (cut
    off by max_tokens) is returned as content; streamed, what was sent stays sent.
    """

    def __init__(self, mode: str, name: str | None) -> None:
        self.mode = mode
        self.name = name
        self.call_id = random_call_id()
        self.started = False  # streaming: the named call's first piece was sent
        self._array = ForcedCallArrayStream() if mode == "required" else None

    def calls(self, text: str) -> list[ResponseToolCall] | None:
        if self.mode == "named":
            found = [(self.name, text)]
        else:
            found = parse_required_calls(text)
            if found is None:
                return None
        return [
            ResponseToolCall(
                id=self.call_id if i == 0 else random_call_id(),
                function=ResponseFunctionCall(name=name, arguments=args),
            )
            for i, (name, args) in enumerate(found)
        ]

    def message(self, text: str, role: str) -> tuple[ChatResponseMessage, bool]:
        calls = self.calls(text)
        if calls is None:
            return ChatResponseMessage(role=role, content=text), False
        return ChatResponseMessage(role=role, content=None, tool_calls=calls), True

    def feed(self, delta: str, text: str, finished: bool
             ) -> tuple[str | None, list[DeltaToolCall], bool]:
        """(content, tool-call pieces, whether calls were made) for the next piece."""
        if self.mode == "named":
            if not delta and self.started:
                return None, [], True
            piece = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta))
            if not self.started:
                piece.id, piece.type = self.call_id, "function"
                piece.function.name = self.name
                self.started = True
            return None, [piece], True
        pieces = _tool_call_deltas(self._array.extract_streaming("", delta))
        if finished:
            pieces += _tool_call_deltas(self._array.finish())
        return None, _merge_calls(pieces), self._array.calls_started > 0


def _join(a: str | None, b: str | None) -> str | None:
    return (a or "") + (b or "") or None


def _merge_calls(calls: list[DeltaToolCall]) -> list[DeltaToolCall]:
    """Consecutive pieces of one call in one chunk become one piece."""
    out: list[DeltaToolCall] = []
    for call in calls:
        last = out[-1] if out else None
        if (last is not None and last.index == call.index and call.id is None
                and call.function is not None and call.function.name is None):
            last.function.arguments = (last.function.arguments or "") + (
                call.function.arguments or "")
        else:
            out.append(call)
    return out


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """``tool_calls`` when the model made calls and stopped by itself (as OpenAI and
    vLLM say); a cut-off (``length``) or ``abort`` is kept, since its calls may be
    incomplete."""
    return "tool_calls" if called and reason == "stop" else reason


def _delta_json(delta: dict) -> dict:
    """A delta with only the keys that carry something (nested tool-call keys too)."""
    out = {k: v for k, v in delta.items() if v is not None}
    if "tool_calls" in out:
        calls = []
        for call in out["tool_calls"]:
            call = {k: v for k, v in call.items() if v is not None}
            if call.get("function") is not None:
                call["function"] = {k: v for k, v in call["function"].items() if v is not None}
            calls.append(call)
        out["tool_calls"] = calls
    return out


class ChatServing:
    """Handler of the chat completions API."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        """Render, validate, submit and answer (JSON or SSE)."""
        ctx = self.ctx
        lora = ctx.check_model(req.model)
        check_request_options(ctx, req)
        ctx.check_n(req.n)
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if req.top_logprobs and req.top_logprobs > ctx.engine.engine.max_logprobs:
            raise bad_request(
                f"top_logprobs ({req.top_logprobs}) exceeds the maximum of "
                f"{ctx.engine.engine.max_logprobs} (--max-logprobs)",
                "top_logprobs",
            )
        tool_mode = tool_choice_mode(req, ctx.limits)
        constraint = self._constraint(req, tool_mode)
        forced = None
        if tool_mode in ("required", "named"):
            named = req.tool_choice.function.name if tool_mode == "named" else None
            forced = (tool_mode, named)
        if constraint is not None and req.use_beam_search:
            raise bad_request("structured outputs cannot be combined with use_beam_search",
                              constraint.param)
        template_kwargs = dict(req.chat_template_kwargs or {})
        _, prompt_ids = await ctx.prompts.render_chat(
            req.messages,
            chat_template=ctx.chat_template_for(req.chat_template, template_kwargs),
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            template_kwargs=template_kwargs,
            tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            add_special_tokens=req.add_special_tokens,
        )
        if tool_mode == "auto" and "skip_special_tokens" not in req.model_fields_set:
            # Some formats start with a special token ([TOOL_CALLS], <|python_tag|>) that
            # the parser must see; a client's explicit choice is kept.
            req.skip_special_tokens = False
        # Forced tool calls are read from the constrained JSON, not by the parsers.
        parsers = self._parser_classes(tool_mode) if forced is None else None
        if req.max_completion_tokens is not None:
            requested, param = req.max_completion_tokens, "max_completion_tokens"
        else:  # None: the model's default max_tokens, if any, else as many as fit
            requested, param = req.max_tokens, "max_tokens"
        # -1 keeps what fits with the tokens asked for (either spelling) left to generate.
        truncate = ctx.truncation(req.truncate_prompt_tokens, requested)
        if truncate is not None:
            prompt_ids = prompt_ids[-truncate:]
        max_tokens = ctx.resolve_max_tokens(len(prompt_ids), requested, param, "messages")
        params = build_sampling_params(
            req,
            max_tokens=max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            prompt_logprobs=req.prompt_logprobs,
            defaults=ctx.sampling_defaults,
            structured_outputs=constraint.params if constraint is not None else None,
        )
        base_id = display_id(req, raw_request) or random_id("chatcmpl")
        if req.use_beam_search:
            return await beam_search_response(
                ctx, raw_request, req, base_id, [prompt_ids], [params],
                lambda finals: self._response(req, base_id, finals[0], parsers),
                lora_request=lora,
            )
        request_ids = ctx.engine_request_ids(base_id, 1)
        iterators = await submit_all(
            ctx, request_ids, [engine_prompt(prompt_ids, req.cache_salt)], [params], req.priority,
            constraint.param if constraint is not None else None, lora_request=lora,
        )
        if req.stream:
            return SSEResponse(
                self._stream(req, base_id, iterators, len(prompt_ids), parsers, forced),
                on_close=lambda: abort_all(ctx, request_ids),
            )
        finals = await finals_unless_disconnected(ctx, raw_request, request_ids, iterators)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(
            self._response(req, base_id, finals[0], parsers, forced).model_dump())

    @staticmethod
    def _constraint(req: ChatCompletionRequest, tool_mode: str) -> RequestConstraint | None:
        """The request's structured-output constraint: its own (response_format,
        structured_outputs, guided_*) or the one a forced tool_choice implies."""
        constraint = request_constraint(req, "chat completions")
        schema = forced_tool_schema(req) if tool_mode in ("required", "named") else None
        if schema is None:
            return constraint
        if constraint is not None:
            raise bad_request(
                f'tool_choice "required" or a named function constrains the output to tool '
                f"calls; it cannot be combined with {constraint.param}", "tool_choice")
        return RequestConstraint(StructuredOutputsParams(json=schema), "tools")

    def _parser_classes(self, tool_mode: str):
        """(reasoning parser class, tool parser class), either None; None if neither."""
        limits = self.ctx.limits
        reasoning = get_reasoning_parser(limits.reasoning_parser) if limits.reasoning_parser \
            else None
        tools = get_tool_parser(limits.tool_call_parser) if tool_mode == "auto" else None
        return (reasoning, tools) if reasoning is not None or tools is not None else None

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int], entries) -> ChatLogprobs:
        tok = self.ctx.tokenizer
        content = []
        for pos, tid in enumerate(token_ids):
            entry = entries[pos] if entries is not None and pos < len(entries) else None
            as_ids = req.return_tokens_as_token_ids
            text = token_text(tok, tid, entry.get(tid) if entry else None, as_ids)
            chosen = chosen_logprob(entry, tid)
            tops = [
                TopLogprob(
                    token=(t_text := token_text(tok, t, lp, as_ids)),
                    logprob=max(lp.logprob, MIN_LOGPROB),
                    bytes=list(t_text.encode("utf-8")),
                )
                for t, lp in ranked(entry, req.top_logprobs or 0)
            ]
            content.append(
                ChatTokenLogprob(
                    token=text,
                    logprob=chosen if chosen is not None else MIN_LOGPROB,
                    bytes=list(text.encode("utf-8")),
                    top_logprobs=tops,
                )
            )
        return ChatLogprobs(content=content)

    def _message(self, text: str, parsers) -> tuple[ChatResponseMessage, bool]:
        """The reply message of one choice, and whether it made tool calls."""
        role = self.ctx.limits.response_role
        if parsers is None:
            return ChatResponseMessage(role=role, content=text), False
        choice = _ChoiceParsers(*parsers)
        reasoning, content, calls = choice.parse(text)
        message = ChatResponseMessage(
            role=role, content=content, reasoning_content=reasoning, tool_calls=calls
        )
        return message, choice.called

    def _response(
        self, req: ChatCompletionRequest, base_id: str, final: RequestOutput, parsers=None,
        forced: tuple[str, str | None] | None = None,
    ) -> ChatCompletionResponse:
        choices = []
        for comp in final.outputs:
            if forced is not None:
                message, called = _ForcedCalls(*forced).message(
                    comp.text, self.ctx.limits.response_role)
            else:
                message, called = self._message(comp.text, parsers)
            choices.append(ChatChoice(
                index=comp.index,
                message=message,
                logprobs=self._logprobs(req, comp.token_ids, comp.logprobs)
                if req.logprobs
                else None,
                finish_reason=_finish_reason(comp.finish_reason, called),
                stop_reason=comp.stop_reason,
            ))
        choices.sort(key=lambda c: c.index)
        return ChatCompletionResponse(
            id=base_id,
            model=self.ctx.response_model(req.model),
            choices=choices,
            usage=usage_of([final]),
            prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs)
            if req.prompt_logprobs is not None
            else None,
        )

    async def _stream(
        self,
        req: ChatCompletionRequest,
        base_id: str,
        iterators: list[AsyncIterator],
        num_prompt_tokens: int,
        parsers=None,
        forced: tuple[str, str | None] | None = None,
    ) -> AsyncIterator[str]:
        model = self.ctx.response_model(req.model)
        created = ChatCompletionChunk(id=base_id, model=model, choices=[]).created
        include_usage, continuous = usage_options(req)
        latest: RequestOutput | None = None
        # continuous_usage_stats: every chunk has usage, the role chunks the prompt's alone.
        before_output = UsageInfo(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens)

        def chunk(choice: ChatStreamChoice) -> str:
            running = usage_of([latest]) if latest is not None else before_output
            body = ChatCompletionChunk(
                id=base_id,
                created=created,
                model=model,
                choices=[choice],
                usage=running if continuous else None,
            ).model_dump()
            # OpenAI's deltas carry only the keys that changed (role first, then content).
            body["choices"][0]["delta"] = _delta_json(body["choices"][0]["delta"])
            return sse(body)

        # The role comes first, in a chunk of its own for every choice, as OpenAI does.
        for index in range(req.n):
            yield chunk(
                ChatStreamChoice(index=index, delta=DeltaMessage(role=self.ctx.limits.response_role, content=""))
            )
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        # One set of parsers per choice (n > 1: each keeps its own streaming state).
        per_choice = (
            {i: _ChoiceParsers(*parsers) for i in range(req.n)} if parsers is not None else None
        )
        per_choice_forced = (
            {i: _ForcedCalls(*forced) for i in range(req.n)} if forced is not None else None
        )
        done: set[int] = set()
        final: RequestOutput | None = None
        merged = merge_streams(iterators)
        try:
            async with contextlib.aclosing(merged):
                async for _, out in merged:
                    latest = out
                    for comp in out.outputs:
                        if comp.index in done:
                            continue
                        t0 = sent_text.get(comp.index, 0)
                        n0 = sent_tokens.get(comp.index, 0)
                        delta = comp.text[t0:]
                        new_ids = comp.token_ids[n0:]
                        if not delta and not new_ids and not comp.finished:
                            continue
                        lps = None
                        if req.logprobs:
                            entries = (
                                comp.logprobs[n0 : len(comp.token_ids)] if comp.logprobs else None
                            )
                            lps = self._logprobs(req, new_ids, entries)
                        sent_text[comp.index] = len(comp.text)
                        sent_tokens[comp.index] = len(comp.token_ids)
                        if comp.finished:
                            done.add(comp.index)
                        finish_reason = comp.finish_reason
                        if per_choice_forced is not None:
                            f = per_choice_forced.setdefault(comp.index, _ForcedCalls(*forced))
                            content, calls, called = f.feed(delta, comp.text, comp.finished)
                            finish_reason = _finish_reason(comp.finish_reason, called)
                            message = DeltaMessage(content=content, tool_calls=calls or None)
                            held_back = content is None and not calls
                            if held_back and not comp.finished and not (lps and lps.content):
                                continue  # a "required" array is sent once complete
                        elif per_choice is None:
                            message = DeltaMessage(content=delta)
                        else:
                            p = per_choice.setdefault(comp.index, _ChoiceParsers(*parsers))
                            reasoning, content, calls = p.feed(delta)
                            if comp.finished:
                                r2, c2, more = p.finish()
                                reasoning, content = _join(reasoning, r2), _join(content, c2)
                                calls = calls + more
                            finish_reason = _finish_reason(comp.finish_reason, p.called)
                            message = DeltaMessage(
                                content=content,
                                reasoning_content=reasoning,
                                tool_calls=_merge_calls(calls) or None,
                            )
                            held_back = (
                                reasoning is None and content is None and not calls
                            )
                            if held_back and not comp.finished and not (lps and lps.content):
                                continue  # the parsers hold this text back for now
                        yield chunk(
                            ChatStreamChoice(
                                index=comp.index,
                                delta=message,
                                logprobs=lps,
                                finish_reason=finish_reason,
                                stop_reason=comp.stop_reason,
                            )
                        )
                    if out.finished:
                        final = out
            if include_usage and final is not None:
                yield sse(
                    ChatCompletionChunk(
                        id=base_id,
                        created=created,
                        model=model,
                        choices=[],
                        usage=usage_of([final]),
                    ).model_dump()
                )
        except ENGINE_ERRORS as exc:
            yield error_event(engine_error(exc))
        except OpenAIServingError as exc:
            yield error_event(exc)
        yield SSE_DONE
