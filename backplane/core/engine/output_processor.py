"""Turns EngineCore outputs into RequestOutputs: text, stop strings, logprobs, n>1 fan-in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from backplane.core.engine.detokenizer import IncrementalDetokenizer
from backplane.core.engine.engine_core import EngineCoreOutput
from backplane.core.model_runner.runner import TokenLogprobs
from backplane.outputs import CompletionOutput, Logprob, RequestOutput
from backplane.sampling_params import SamplingParams


@dataclass
class SequenceState:
    """One completion being generated (a child of a request when n > 1)."""

    seq_id: str
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestState:
    """A user request: prompt, its sequences, and timing for metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[SequenceState]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class OutputProcessor:
    """Keeps per-request text state and builds RequestOutputs as tokens arrive."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.seq_to_request: dict[str, tuple[RequestState, SequenceState]] = {}

    def add_request(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        for seq in state.sequences:
            self.seq_to_request[seq.seq_id] = (state, seq)

    def new_sequence(self, seq_id: str, index: int, params: SamplingParams,
                     prompt_token_ids: list[int]) -> SequenceState:
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens,
            params.include_stop_str_in_output, params.spaces_between_special_tokens,
        )
        return SequenceState(
            seq_id, index, params, detok,
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
        )

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply a step's outputs.

        Returns:
            (RequestOutputs of requests that progressed, sequence ids that a stop
            string finished and that the engine core must now end)
        """
        touched: dict[str, RequestState] = {}
        stopped_by_string: list[str] = []
        now = time.monotonic()
        for out in outputs:
            entry = self.seq_to_request.get(out.request_id)
            if entry is None:
                continue
            state, seq = entry
            if seq.finish_reason is not None:
                continue
            if out.prompt_logprobs is not None and seq.index == 0:
                self._add_prompt_logprobs(state, out.prompt_logprobs)
            if out.new_token_ids:
                if state.first_token_time is None:
                    state.first_token_time = now
                state.num_cached_tokens = out.num_cached_tokens
                new_ids = out.new_token_ids
                text_ids = new_ids
                if (out.finish_status is not None and out.finish_status.finish_reason == "stop"
                        and not seq.params.include_stop_str_in_output):
                    # The EOS or stop token that ended generation is not part of the
                    # text (its special-token text would otherwise show with
                    # skip_special_tokens=False), unless include_stop_str_in_output.
                    text_ids = text_ids[:-1]
                if seq.detok.stop and len(text_ids) > 1:
                    # Several tokens at once (speculative decoding): a stop string
                    # ends the output at the token completing it, as one at a time would.
                    stop = None
                    for count, token_id in enumerate(text_ids, start=1):
                        stop = seq.detok.add_tokens([token_id])
                        if stop is not None:
                            new_ids = new_ids[:count]
                            break
                else:
                    stop = seq.detok.add_tokens(text_ids) if text_ids else None
                seq.token_ids.extend(new_ids)
                if out.logprobs is not None and seq.logprobs is not None:
                    self._add_logprobs(seq, out.logprobs, len(new_ids))
                if out.finish_status is not None and stop is None:
                    seq.finish_reason = out.finish_status.finish_reason
                    seq.stop_reason = out.stop_reason
                    seq.detok.flush()
                elif stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    stopped_by_string.append(seq.seq_id)
            elif out.finish_status is not None:
                # Ended by the engine core without a new token (a structured-output
                # grammar that failed to compile: "abort").
                seq.finish_reason = out.finish_status.finish_reason
                seq.stop_reason = out.stop_reason
                seq.detok.flush()
            touched[state.request_id] = state
        results = [self._make_output(state) for state in touched.values()]
        for state in touched.values():
            if state.finished:
                self._forget(state)
        return results, stopped_by_string

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark a request's unfinished sequences aborted; returns its final output."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        self._forget(state)
        return self._make_output(state)

    def _forget(self, state: RequestState) -> None:
        self.requests.pop(state.request_id, None)
        for seq in state.sequences:
            self.seq_to_request.pop(seq.seq_id, None)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprob_dicts(self, lp: TokenLogprobs) -> list[dict[int, Logprob]]:
        out = []
        for pos in range(lp.ids.shape[0]):
            entry: dict[int, Logprob] = {}
            for col in range(lp.ids.shape[1]):
                tid = int(lp.ids[pos, col])
                if tid in entry:
                    continue
                # Column 0 is the actual token (rank from the sampler); then top-k by rank.
                rank = int(lp.ranks[pos]) if col == 0 else col
                entry[tid] = Logprob(float(lp.logprobs[pos, col]), rank, self._decode_token(tid))
            out.append(entry)
        return out

    def _add_logprobs(self, seq: SequenceState, lp: TokenLogprobs, count: int) -> None:
        """Logprobs of the first ``count`` positions of ``lp`` (those of kept tokens)."""
        if count < lp.ids.shape[0]:
            lp = TokenLogprobs(lp.ids[:count], lp.logprobs[:count], lp.ranks[:count])
        seq.logprobs.extend(self._logprob_dicts(lp))
        seq.cumulative_logprob += float(lp.logprobs[:, 0].sum())

    def _add_prompt_logprobs(self, state: RequestState, lp: TokenLogprobs) -> None:
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no context
        state.prompt_logprobs.extend(self._logprob_dicts(lp))

    def _make_output(self, state: RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=seq.detok.visible_text(seq.finish_reason is not None),
                token_ids=list(seq.token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=seq.logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in state.sequences
        ]
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs,
            outputs=completions,
            finished=state.finished,
            metrics=metrics,
            num_cached_tokens=state.num_cached_tokens,
        )
