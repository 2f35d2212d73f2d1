"""``POST /v1/completions``: prompts in, text completions out (whole or streamed)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from backplane.entrypoints.openai.errors import (
    ENGINE_ERRORS,
    OpenAIServingError,
    bad_request,
    engine_error,
)
from backplane.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from backplane.entrypoints.openai.serving_beam_search import beam_search_response
from backplane.entrypoints.openai.serving_common import (
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
from backplane.entrypoints.openai.structured_outputs import request_constraint
from backplane.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class _ChoiceState:
    """How much of one choice has been sent so far (streaming)."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


@dataclass
class _ResponseView:
    """How the engine's outputs are shown for one request.

    ``prompt_only`` (echo with max_tokens 0): the engine generates one token to
    score the prompt; that token is not shown, and usage counts none.
    """

    req: CompletionRequest
    prompt_only: bool = False

    def visible(self, comp: CompletionOutput) -> CompletionOutput:
        if not self.prompt_only:
            return comp
        return CompletionOutput(
            index=comp.index, text="", token_ids=[], logprobs=[] if comp.logprobs else None,
            finish_reason="length" if comp.finished else None,
        )

    def usage(self, finals: list[RequestOutput]):
        usage = usage_of(finals)
        if self.prompt_only:
            usage.completion_tokens = 0
            usage.total_tokens = usage.prompt_tokens
        return usage


class CompletionServing:
    """Handler of the completions API."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw_request: Request) -> Response:
        """Validate, submit one engine request per prompt, and answer (JSON or SSE)."""
        ctx = self.ctx
        lora = ctx.check_model(req.model)
        check_request_options(ctx, req)
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        prompt_only = req.max_tokens == 0
        if prompt_only and not req.echo:
            raise bad_request(
                "max_tokens 0 is only allowed with echo (to score the prompt); use >= 1",
                "max_tokens",
            )
        prompts = await self._prompts(req)
        ctx.check_n(req.n, len(prompts))
        logprobs = req.logprobs
        base_id = display_id(req, raw_request) or random_id("cmpl")
        prompt_logprobs = req.prompt_logprobs
        if req.echo and logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, logprobs)
        constraint = request_constraint(req, "completions")
        if constraint is not None and req.use_beam_search:
            raise bad_request("structured outputs cannot be combined with use_beam_search",
                              constraint.param)
        params = []
        # Left unset, max_tokens is the model's max_new_tokens if it has one (else 16).
        requested = 1 if prompt_only else ctx.requested_max_tokens(req, "max_tokens")
        defaults = ctx.sampling_defaults
        for p in prompts:
            max_tokens = ctx.resolve_max_tokens(
                len(p.token_ids), requested, "max_tokens", "prompt"
            )
            params.append(
                build_sampling_params(
                    req, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                    defaults=defaults,
                    structured_outputs=constraint.params if constraint is not None else None,
                )
            )
        view = _ResponseView(req, prompt_only)
        if req.use_beam_search:
            return await beam_search_response(
                ctx, raw_request, req, base_id, [p.token_ids for p in prompts], params,
                lambda finals: self._response(view, base_id, prompts, finals),
                lora_request=lora,
            )
        request_ids = ctx.engine_request_ids(base_id, len(prompts))
        iterators = await submit_all(
            ctx, request_ids, [engine_prompt(p.token_ids, req.cache_salt) for p in prompts],
            params, req.priority, constraint.param if constraint is not None else None,
            lora_request=lora,
        )
        if req.stream:
            return SSEResponse(
                self._stream(view, base_id, prompts, iterators),
                on_close=lambda: abort_all(ctx, request_ids),
            )
        finals = await finals_unless_disconnected(ctx, raw_request, request_ids, iterators)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(self._response(view, base_id, prompts, finals).model_dump())

    # ----- prompts -----

    async def _prompts(self, req: CompletionRequest) -> list[_Prompt]:
        ctx = self.ctx
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list = [prompt]
        elif not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        elif all(isinstance(x, int) for x in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        truncate = ctx.truncation(req.truncate_prompt_tokens, req.max_tokens)
        out = []
        for item in items:
            if isinstance(item, str):
                ids = await ctx.prompts.tokenize(
                    item, "prompt", add_special_tokens=req.add_special_tokens,
                    truncate_to=truncate,
                )
                out.append(_Prompt(item if truncate is None else None, ids))
            else:
                ctx.check_token_ids(item, "prompt")
                out.append(_Prompt(None, list(item)[-truncate:] if truncate else list(item)))
            if not out[-1].token_ids:
                raise bad_request("prompt must not be empty (it has no tokens)", "prompt")
        return out

    def _prompt_text(self, p: _Prompt) -> str:
        return p.text if p.text is not None else self.ctx.tokenizer.decode(p.token_ids)

    # ----- logprobs -----

    def _logprobs(
        self,
        token_ids: list[int],
        entries: list | None,
        offset: int,
        as_ids: bool = False,
    ) -> CompletionLogprobs:
        """Completions-format logprobs for ``token_ids`` whose text starts at ``offset``.

        ``as_ids`` (return_tokens_as_token_ids) shows each token as ``token_id:N``.
        """
        tok = self.ctx.tokenizer
        result = CompletionLogprobs()
        for pos, tid in enumerate(token_ids):
            entry: dict[int, Logprob] | None = (
                entries[pos] if entries is not None and pos < len(entries) else None
            )
            text = token_text(tok, tid, entry.get(tid) if entry else None, as_ids)
            result.tokens.append(text)
            result.token_logprobs.append(chosen_logprob(entry, tid))
            top: dict[str, float] | None = None
            if entry:
                top = {}
                # best first; tokens that decode to the same text keep the best logprob
                for t, _lp in ranked(entry, len(entry)):
                    top.setdefault(token_text(tok, t, _lp, as_ids), chosen_logprob(entry, t))
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def _echo_logprobs(self, p: _Prompt, prompt_logprobs, as_ids: bool) -> CompletionLogprobs:
        entries = list(prompt_logprobs) if prompt_logprobs else [None] * len(p.token_ids)
        return self._logprobs(p.token_ids, entries, 0, as_ids)

    # ----- whole response -----

    def _response(
        self,
        view: _ResponseView,
        base_id: str,
        prompts: list[_Prompt],
        finals: list[RequestOutput],
    ) -> CompletionResponse:
        req = view.req
        as_ids = req.return_tokens_as_token_ids
        choices = []
        for i, (p, out) in enumerate(zip(prompts, finals, strict=True)):
            for comp in map(view.visible, out.outputs):
                text = comp.text
                lps = None
                if req.echo:
                    prefix = self._prompt_text(p)
                    text = prefix + text
                if req.logprobs is not None:
                    start = 0
                    if req.echo:
                        lps = self._echo_logprobs(p, out.prompt_logprobs, as_ids)
                        start = len(self._prompt_text(p))
                    gen = self._logprobs(comp.token_ids, comp.logprobs, start, as_ids)
                    lps = _concat(lps, gen)
                choices.append(
                    CompletionChoice(
                        index=i * req.n + comp.index,
                        text=text,
                        logprobs=lps,
                        finish_reason=comp.finish_reason,
                        stop_reason=comp.stop_reason,
                        prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs)
                        if req.prompt_logprobs is not None
                        else None,
                    )
                )
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(
            id=base_id, model=self.ctx.response_model(view.req.model), choices=choices,
            usage=view.usage(finals),
        )

    # ----- streaming -----

    async def _stream(
        self,
        view: _ResponseView,
        base_id: str,
        prompts: list[_Prompt],
        iterators: list[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[str]:
        req = view.req
        model = self.ctx.response_model(req.model)
        created = CompletionResponse(id=base_id, model=model, choices=[]).created
        states: dict[int, _ChoiceState] = {}
        finals: list[RequestOutput | None] = [None] * len(prompts)
        latest: list[RequestOutput | None] = [None] * len(prompts)
        include_usage, continuous = usage_options(req)
        merged = merge_streams(iterators)
        try:
            async with contextlib.aclosing(merged):
                async for i, out in merged:
                    latest[i] = out
                    for comp in map(view.visible, out.outputs):
                        idx = i * req.n + comp.index
                        state = states.setdefault(idx, _ChoiceState())
                        choice = self._delta_choice(req, prompts[i], out, comp, idx, state)
                        if choice is None:
                            continue
                        chunk = CompletionResponse(
                            id=base_id,
                            created=created,
                            model=model,
                            choices=[choice],
                            usage=view.usage([o for o in latest if o is not None])
                            if continuous
                            else None,
                        )
                        yield sse(chunk.model_dump())
                    if out.finished:
                        finals[i] = out
            if include_usage:
                usage = view.usage([f for f in finals if f is not None])
                chunk = CompletionResponse(
                    id=base_id, created=created, model=model, choices=[], usage=usage
                )
                yield sse(chunk.model_dump())
        except ENGINE_ERRORS as exc:
            yield error_event(engine_error(exc))
        except OpenAIServingError as exc:
            yield error_event(exc)
        yield SSE_DONE

    def _delta_choice(
        self,
        req: CompletionRequest,
        prompt: _Prompt,
        out: RequestOutput,
        comp: CompletionOutput,
        idx: int,
        state: _ChoiceState,
    ) -> CompletionChoice | None:
        """The chunk choice with what ``comp`` added since the last one, or None if nothing."""
        if state.finished:
            return None
        delta_text = comp.text[state.text_len :]
        new_ids = comp.token_ids[state.num_tokens :]
        # Nothing new yet (e.g. a prefill chunk); echo waits for the first token, when
        # the prompt logprobs are complete.
        if not delta_text and not new_ids and not comp.finished:
            return None
        prefix = ""
        lps = None
        first = not state.started
        as_ids = req.return_tokens_as_token_ids
        if not state.started and req.echo:
            prefix = self._prompt_text(prompt)
            if req.logprobs is not None:
                lps = self._echo_logprobs(prompt, out.prompt_logprobs, as_ids)
            state.text_offset = len(prefix)
        if req.logprobs is not None:
            entries = (
                comp.logprobs[state.num_tokens : len(comp.token_ids)] if comp.logprobs else None
            )
            gen = self._logprobs(new_ids, entries, state.text_offset, as_ids)
            state.text_offset = (
                (gen.text_offset[-1] + len(gen.tokens[-1])) if gen.tokens else state.text_offset
            )
            lps = _concat(lps, gen)
        state.started = True
        state.text_len = len(comp.text)
        state.num_tokens = len(comp.token_ids)
        state.finished = comp.finished
        return CompletionChoice(
            index=idx,
            text=prefix + delta_text,
            logprobs=lps,
            finish_reason=comp.finish_reason,
            stop_reason=comp.stop_reason,
            prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs)
            if req.prompt_logprobs is not None and first
            else None,
        )


def _concat(first: CompletionLogprobs | None, second: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return second
    return CompletionLogprobs(
        text_offset=first.text_offset + second.text_offset,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )
