"""``POST /v1/completions``: prompts in, text completions out (whole or streamed)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from backplane.core.engine.async_engine import EngineDeadError, RequestAbortedError
from backplane.entrypoints.openai.errors import OpenAIServingError, bad_request, engine_dead
from backplane.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from backplane.entrypoints.openai.serving_common import (
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


class CompletionServing:
    """Handler of the completions API."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw_request: Request) -> Response:
        """Validate, submit one engine request per prompt, and answer (JSON or SSE)."""
        ctx = self.ctx
        ctx.check_model(req.model)
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        prompts = self._prompts(req.prompt)
        logprobs = req.logprobs
        base_id = req.request_id or random_id("cmpl")
        params = []
        for p in prompts:
            max_tokens = ctx.resolve_max_tokens(
                len(p.token_ids), req.max_tokens, "max_tokens", "prompt"
            )
            params.append(
                build_sampling_params(
                    req,
                    max_tokens=max_tokens,
                    logprobs=logprobs,
                    prompt_logprobs=logprobs if (req.echo and logprobs is not None) else None,
                )
            )
        request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        iterators = await submit_all(
            ctx, request_ids, [p.token_ids for p in prompts], params, req.priority
        )
        if req.stream:
            return SSEResponse(
                self._stream(req, base_id, prompts, iterators),
                on_close=lambda: abort_all(ctx, request_ids),
            )
        try:
            finals = await run_unless_disconnected(raw_request, collect_finals(iterators))
        except ClientDisconnected:
            return Response(status_code=499)
        except (EngineDeadError, RequestAbortedError) as exc:
            raise engine_dead(exc) from None
        finally:
            abort_all(ctx, request_ids)
        return JSONResponse(self._response(req, base_id, prompts, finals).model_dump())

    # ----- prompts -----

    def _prompts(self, prompt) -> list[_Prompt]:
        ctx = self.ctx
        if isinstance(prompt, str):
            items: list = [prompt]
        elif not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        elif all(isinstance(x, int) for x in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        out = []
        for item in items:
            if isinstance(item, str):
                ids = ctx.tokenizer(item).input_ids
                out.append(_Prompt(item, list(ids)))
            else:
                ctx.check_token_ids(item, "prompt")
                out.append(_Prompt(None, list(item)))
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
    ) -> CompletionLogprobs:
        """Completions-format logprobs for ``token_ids`` whose text starts at ``offset``."""
        tok = self.ctx.tokenizer
        result = CompletionLogprobs()
        for pos, tid in enumerate(token_ids):
            entry: dict[int, Logprob] | None = (
                entries[pos] if entries is not None and pos < len(entries) else None
            )
            text = token_text(tok, tid, entry.get(tid) if entry else None)
            result.tokens.append(text)
            result.token_logprobs.append(chosen_logprob(entry, tid))
            top: dict[str, float] | None = None
            if entry:
                top = {}
                # best first; tokens that decode to the same text keep the best logprob
                for t, _lp in ranked(entry, len(entry)):
                    top.setdefault(token_text(tok, t, _lp), chosen_logprob(entry, t))
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def _echo_logprobs(self, p: _Prompt, prompt_logprobs) -> CompletionLogprobs:
        entries = list(prompt_logprobs) if prompt_logprobs else [None] * len(p.token_ids)
        return self._logprobs(p.token_ids, entries, 0)

    # ----- whole response -----

    def _response(
        self,
        req: CompletionRequest,
        base_id: str,
        prompts: list[_Prompt],
        finals: list[RequestOutput],
    ) -> CompletionResponse:
        choices = []
        for i, (p, out) in enumerate(zip(prompts, finals, strict=True)):
            for comp in out.outputs:
                text = comp.text
                lps = None
                if req.echo:
                    prefix = self._prompt_text(p)
                    text = prefix + text
                if req.logprobs is not None:
                    start = 0
                    if req.echo:
                        lps = self._echo_logprobs(p, out.prompt_logprobs)
                        start = len(self._prompt_text(p))
                    gen = self._logprobs(comp.token_ids, comp.logprobs, start)
                    lps = _concat(lps, gen)
                choices.append(
                    CompletionChoice(
                        index=i * req.n + comp.index,
                        text=text,
                        logprobs=lps,
                        finish_reason=comp.finish_reason,
                        stop_reason=comp.stop_reason,
                    )
                )
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(
            id=base_id, model=self.ctx.model_name, choices=choices, usage=usage_of(finals)
        )

    # ----- streaming -----

    async def _stream(
        self,
        req: CompletionRequest,
        base_id: str,
        prompts: list[_Prompt],
        iterators: list[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[str]:
        created = CompletionResponse(id=base_id, model=self.ctx.model_name, choices=[]).created
        states: dict[int, _ChoiceState] = {}
        finals: list[RequestOutput | None] = [None] * len(prompts)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        merged = merge_streams(iterators)
        try:
            async with contextlib.aclosing(merged):
                async for i, out in merged:
                    for comp in out.outputs:
                        idx = i * req.n + comp.index
                        state = states.setdefault(idx, _ChoiceState())
                        choice = self._delta_choice(req, prompts[i], out, comp, idx, state)
                        if choice is None:
                            continue
                        chunk = CompletionResponse(
                            id=base_id,
                            created=created,
                            model=self.ctx.model_name,
                            choices=[choice],
                        )
                        yield sse(chunk.model_dump())
                    if out.finished:
                        finals[i] = out
            if include_usage:
                usage = usage_of([f for f in finals if f is not None])
                chunk = CompletionResponse(
                    id=base_id, created=created, model=self.ctx.model_name, choices=[], usage=usage
                )
                yield sse(chunk.model_dump())
        except (EngineDeadError, RequestAbortedError) as exc:
            yield error_event(engine_dead(exc))
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
        if not state.started and req.echo:
            prefix = self._prompt_text(prompt)
            if req.logprobs is not None:
                lps = self._echo_logprobs(prompt, out.prompt_logprobs)
            state.text_offset = len(prefix)
        if req.logprobs is not None:
            entries = (
                comp.logprobs[state.num_tokens : len(comp.token_ids)] if comp.logprobs else None
            )
            gen = self._logprobs(new_ids, entries, state.text_offset)
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
