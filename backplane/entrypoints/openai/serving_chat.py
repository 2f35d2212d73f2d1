"""``POST /v1/chat/completions``: messages rendered by the chat template, replies out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from backplane.core.engine.async_engine import EngineDeadError, RequestAbortedError
from backplane.entrypoints.openai.errors import OpenAIServingError, bad_request, engine_dead
from backplane.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    random_id,
)
from backplane.entrypoints.openai.serving_common import (
    MIN_LOGPROB,
    SSE_DONE,
    ClientDisconnected,
    ServingContext,
    SSEResponse,
    abort_all,
    build_sampling_params,
    chosen_logprob,
    collect_finals,
    error_event,
    merge_streams,
    ranked,
    run_unless_disconnected,
    sse,
    submit_all,
    token_text,
    usage_of,
)
from backplane.outputs import RequestOutput


def render_chat_prompt(
    tokenizer,
    messages: list[ChatMessage],
    *,
    chat_template: str | None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict | None = None,
) -> tuple[str, list[int]]:
    """The prompt text and token ids of a conversation, through the chat template.

    Raises a 400 when the tokenizer has no template or the template rejects
    the conversation (e.g. roles that do not alternate).
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise bad_request(
            "this model's tokenizer has no chat template; use /v1/completions, or start the "
            "server with --chat-template FILE",
            "messages",
        )
    if add_generation_prompt and continue_final_message:
        raise bad_request(
            "add_generation_prompt and continue_final_message cannot both be true",
            "continue_final_message",
        )
    conversation = [_message_dict(m, i) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise bad_request(f"chat template failed on these messages: {exc}", "messages") from None
    # The template already places BOS and other special tokens where the model expects them.
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text, list(ids)


def _message_dict(message: ChatMessage, index: int) -> dict:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"messages[{index}].content: only text parts are supported, got "
                    f"type {part.get('type')!r}",
                    "messages",
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    out = message.model_dump(exclude_none=True)
    out["content"] = content if content is not None else ""
    return out


class ChatServing:
    """Handler of the chat completions API."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        """Render, validate, submit and answer (JSON or SSE)."""
        ctx = self.ctx
        ctx.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        _, prompt_ids = render_chat_prompt(
            ctx.tokenizer,
            req.messages,
            chat_template=req.chat_template or ctx.chat_template,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            template_kwargs=req.chat_template_kwargs,
        )
        if req.max_completion_tokens is not None:
            requested, param = req.max_completion_tokens, "max_completion_tokens"
        else:
            requested, param = req.max_tokens, "max_tokens"
        max_tokens = ctx.resolve_max_tokens(len(prompt_ids), requested, param, "messages")
        params = build_sampling_params(
            req, max_tokens=max_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None
        )
        base_id = req.request_id or random_id("chatcmpl")
        request_ids = [base_id]
        iterators = await submit_all(ctx, request_ids, [prompt_ids], [params], req.priority)
        if req.stream:
            return SSEResponse(
                self._stream(req, base_id, iterators), on_close=lambda: abort_all(ctx, request_ids)
            )
        try:
            finals = await run_unless_disconnected(raw_request, collect_finals(iterators))
        except ClientDisconnected:
            return Response(status_code=499)
        except (EngineDeadError, RequestAbortedError) as exc:
            raise engine_dead(exc) from None
        finally:
            abort_all(ctx, request_ids)
        return JSONResponse(self._response(req, base_id, finals[0]).model_dump())

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int], entries) -> ChatLogprobs:
        tok = self.ctx.tokenizer
        content = []
        for pos, tid in enumerate(token_ids):
            entry = entries[pos] if entries is not None and pos < len(entries) else None
            text = token_text(tok, tid, entry.get(tid) if entry else None)
            chosen = chosen_logprob(entry, tid)
            tops = [
                TopLogprob(
                    token=(t_text := token_text(tok, t, lp)),
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
                message=ChatResponseMessage(content=comp.text),
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
            id=base_id, model=self.ctx.model_name, choices=choices, usage=usage_of([final])
        )

    async def _stream(
        self, req: ChatCompletionRequest, base_id: str, iterators: list[AsyncIterator]
    ) -> AsyncIterator[str]:
        model = self.ctx.model_name
        created = ChatCompletionChunk(id=base_id, model=model, choices=[]).created
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choice: ChatStreamChoice) -> str:
            body = ChatCompletionChunk(
                id=base_id, created=created, model=model, choices=[choice]
            ).model_dump()
            # OpenAI's deltas carry only the keys that changed (role first, then content).
            delta = body["choices"][0]["delta"]
            body["choices"][0]["delta"] = {k: v for k, v in delta.items() if v is not None}
            return sse(body)

        # The role comes first, in a chunk of its own for every choice, as OpenAI does.
        for index in range(req.n):
            yield chunk(
                ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            )
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()
        final: RequestOutput | None = None
        merged = merge_streams(iterators)
        try:
            async with contextlib.aclosing(merged):
                async for _, out in merged:
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
        except (EngineDeadError, RequestAbortedError) as exc:
            yield error_event(engine_dead(exc))
        except OpenAIServingError as exc:
            yield error_event(exc)
        yield SSE_DONE
