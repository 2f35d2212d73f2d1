"""``POST /v1/chat/completions``: messages rendered by the chat template, replies out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

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
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    random_id,
)
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
from backplane.outputs import RequestOutput

__all__ = ["ChatServing", "render_chat_prompt"]


class ChatServing:
    """Handler of the chat completions API."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        """Render, validate, submit and answer (JSON or SSE)."""
        ctx = self.ctx
        ctx.check_model(req.model)
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
        template_kwargs = dict(req.chat_template_kwargs or {})
        _, prompt_ids = await ctx.prompts.render_chat(
            req.messages,
            chat_template=ctx.chat_template_for(req.chat_template, template_kwargs),
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            template_kwargs=template_kwargs,
            add_special_tokens=req.add_special_tokens,
        )
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
        )
        base_id = display_id(req, raw_request) or random_id("chatcmpl")
        if req.use_beam_search:
            return await beam_search_response(
                ctx, raw_request, req, base_id, [prompt_ids], [params],
                lambda finals: self._response(req, base_id, finals[0]),
            )
        request_ids = ctx.engine_request_ids(base_id, 1)
        iterators = await submit_all(
            ctx, request_ids, [engine_prompt(prompt_ids, req.cache_salt)], [params], req.priority
        )
        if req.stream:
            return SSEResponse(
                self._stream(req, base_id, iterators, len(prompt_ids)),
                on_close=lambda: abort_all(ctx, request_ids),
            )
        finals = await finals_unless_disconnected(ctx, raw_request, request_ids, iterators)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(self._response(req, base_id, finals[0]).model_dump())

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

    def _response(
        self, req: ChatCompletionRequest, base_id: str, final: RequestOutput
    ) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=comp.index,
                message=ChatResponseMessage(role=self.ctx.limits.response_role, content=comp.text),
                logprobs=self._logprobs(req, comp.token_ids, comp.logprobs)
                if req.logprobs
                else None,
                finish_reason=comp.finish_reason,
                stop_reason=comp.stop_reason,
            )
            for comp in final.outputs
        ]
        choices.sort(key=lambda c: c.index)
        return ChatCompletionResponse(
            id=base_id,
            model=self.ctx.model_name,
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
    ) -> AsyncIterator[str]:
        model = self.ctx.model_name
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
            delta = body["choices"][0]["delta"]
            body["choices"][0]["delta"] = {k: v for k, v in delta.items() if v is not None}
            return sse(body)

        # The role comes first, in a chunk of its own for every choice, as OpenAI does.
        for index in range(req.n):
            yield chunk(
                ChatStreamChoice(index=index, delta=DeltaMessage(role=self.ctx.limits.response_role, content=""))
            )
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
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
                        yield chunk(
                            ChatStreamChoice(
                                index=comp.index,
                                delta=DeltaMessage(content=delta),
                                logprobs=lps,
                                finish_reason=comp.finish_reason,
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
