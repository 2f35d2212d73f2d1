"""Beam search on top of the engine, with vLLM's algorithm and result shapes.

The engine itself only ever generates one token per request. Each beam search
step turns every live beam (prompt + tokens so far) into one engine request
for ``max_tokens=1`` with ``logprobs=2 * beam_width``; all beams of all
prompts of a step are submitted together, so the engine batches them, and the
prefix cache serves the part of each beam that earlier steps already computed
(its full KV blocks), so a step costs each beam less than one block of tokens.

From the reported top logprobs, every (beam, token) pair is a candidate whose
score is the beam's cumulative logprob plus the token's. A candidate ending in
an EOS token (unless ``ignore_eos``) finishes; of the others the
``beam_width`` best go on. After ``max_tokens`` steps (or when no beam is
left) the finished and the live sequences are ranked together by
`get_beam_search_score` and the ``beam_width`` best are returned, best first.
As in vLLM, the search always runs the full ``max_tokens`` steps while any
beam is live (no early stopping).

`BeamSearch` holds the state and knows nothing of engines: a driver asks it
for the prompts of the next step (`BeamSearch.pending`), runs them, and hands
back each one's top logprobs (`BeamSearch.advance`). `run_beam_search` drives
it with a synchronous step function (`LLM.beam_search`), `run_beam_search_async`
with a coroutine (the OpenAI server, through `AsyncEngine`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

from backplane.core.engine.detokenizer import IncrementalDetokenizer
from backplane.outputs import CompletionOutput, Logprob, RequestOutput
from backplane.sampling_params import BeamSearchParams, SamplingParams

# One step's answer for one beam: the top logprobs of its next token (None if the
# engine produced no token, which drops the beam).
StepResult = dict[int, Logprob] | None
# ``step(prompts, params)``: run one engine request per prompt (its params alongside) and
# return each one's StepResult, in order.
StepFn = Callable[[list, list[SamplingParams]], list[StepResult]]
AsyncStepFn = Callable[[list, list[SamplingParams]], Awaitable[list[StepResult]]]


@dataclass
class BeamSearchSequence:
    """One sequence of a beam search (vLLM's shape).

    Attributes:
        tokens: the prompt's token ids followed by the generated ones (a final
            EOS only with ``include_stop_str_in_output``).
        logprobs: per generated token, the top logprobs the engine reported at
            that position (``{token_id: Logprob}``, the 2 * beam_width best).
        cum_logprob: sum of the generated tokens' logprobs (EOS included).
        text: the generated text (prompt and EOS not included).
        finish_reason: "stop" (EOS) or "length" (max_tokens).
        stop_reason: None (an EOS ends a sequence with stop_reason None, as in `LLM.generate`).
    """

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The result of one prompt's beam search: up to beam_width sequences, best first."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(
    tokens: Sequence[int],
    cumulative_logprob: float,
    eos_token_ids: int | Collection[int] | None,
    length_penalty: float = 1.0,
) -> float:
    """vLLM's final ranking score: ``cumulative_logprob / length ** length_penalty``.

    ``length`` counts every token of ``tokens``, the prompt's included, less a
    final EOS token. (Transformers divides by the generated length instead.)
    """
    if isinstance(eos_token_ids, int):
        eos_token_ids = (eos_token_ids,)
    length = len(tokens)
    if tokens and eos_token_ids and tokens[-1] in eos_token_ids:
        length -= 1
    return cumulative_logprob / (length**length_penalty)


@dataclass
class _Instance:
    """The beam search of one prompt."""

    prompt_token_ids: list[int]
    cache_salt: str | None
    params: BeamSearchParams
    step_params: SamplingParams
    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)
    num_steps: int = 0

    def prompt_for(self, beam: BeamSearchSequence):
        """The engine prompt of one beam (the cache salt keeps its prefix cache apart)."""
        if self.cache_salt is None:
            return beam.tokens
        return {"prompt_token_ids": beam.tokens, "cache_salt": self.cache_salt}


class BeamSearch:
    """The state of a beam search over several prompts.

    Args:
        prompts: each prompt's token ids, or (token ids, cache salt or None).
        params: one BeamSearchParams for all prompts, or one per prompt.
        eos_token_ids: the tokens that end a sequence (the engine's EOS set).
        tokenizer: decodes the final sequences' text.
    """

    def __init__(
        self,
        prompts: Sequence[list[int] | tuple[list[int], str | None]],
        params: BeamSearchParams | Sequence[BeamSearchParams],
        eos_token_ids: Collection[int],
        tokenizer,
    ) -> None:
        params_list = [params] * len(prompts) if isinstance(params, BeamSearchParams) else params
        if len(params_list) != len(prompts):
            raise ValueError(
                f"got {len(params_list)} BeamSearchParams for {len(prompts)} prompts; "
                "pass one or one per prompt"
            )
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.instances: list[_Instance] = []
        for prompt, p in zip(prompts, params_list, strict=True):
            if not isinstance(p, BeamSearchParams):
                raise TypeError(f"params must be BeamSearchParams, got {type(p).__name__}")
            ids, salt = prompt if isinstance(prompt, tuple) else (prompt, None)
            step = SamplingParams(
                temperature=p.temperature, max_tokens=1, logprobs=2 * p.beam_width,
                ignore_eos=True,
            )
            self.instances.append(_Instance(list(ids), salt, p, step, [BeamSearchSequence(list(ids))]))

    @property
    def done(self) -> bool:
        return not any(inst.beams for inst in self.instances)

    def pending(self) -> tuple[list, list[SamplingParams]]:
        """The engine prompts and params of the next step: one per live beam, in order."""
        prompts, params = [], []
        for inst in self.instances:
            for beam in inst.beams:
                prompts.append(inst.prompt_for(beam))
                params.append(inst.step_params)
        return prompts, params

    def advance(self, results: Sequence[StepResult]) -> None:
        """Apply a step's results, one per prompt of `pending` and in its order."""
        expected = sum(len(inst.beams) for inst in self.instances)
        if len(results) != expected:
            raise ValueError(f"got {len(results)} step results for {expected} beams")
        at = 0
        for inst in self.instances:
            mine = results[at : at + len(inst.beams)]
            at += len(inst.beams)
            if inst.beams:
                self._advance_instance(inst, mine)

    def _advance_instance(self, inst: _Instance, results: Sequence[StepResult]) -> None:
        p = inst.params
        # (cumulative logprob, beam, token, that position's top logprobs) of every live candidate
        candidates: list[tuple[float, BeamSearchSequence, int, dict[int, Logprob]]] = []
        for beam, top in zip(inst.beams, results, strict=True):
            for token_id, logprob in (top or {}).items():
                cum = beam.cum_logprob + logprob.logprob
                if token_id in self.eos_token_ids and not p.ignore_eos:
                    tokens = beam.tokens + [token_id] if p.include_stop_str_in_output else beam.tokens
                    inst.completed.append(BeamSearchSequence(
                        list(tokens), [*beam.logprobs, top], cum, finish_reason="stop",
                    ))
                else:
                    candidates.append((cum, beam, token_id, top))
        # All live candidates have the same length, so the cumulative logprob ranks them
        # as the length-penalised score would; the sort is stable (ties: beam order).
        candidates.sort(key=lambda c: c[0], reverse=True)
        inst.beams = [
            BeamSearchSequence(beam.tokens + [token_id], [*beam.logprobs, top], cum)
            for cum, beam, token_id, top in candidates[: p.beam_width]
        ]
        inst.num_steps += 1
        if inst.num_steps >= p.max_tokens:
            for beam in inst.beams:
                beam.finish_reason = "length"
            inst.completed.extend(inst.beams)
            inst.beams = []

    def outputs(self) -> list[BeamSearchOutput]:
        """Each prompt's best sequences, best first, with their text (call once `done`)."""
        results = []
        for inst in self.instances:
            p = inst.params
            ranked = sorted(
                inst.completed,
                key=lambda s: get_beam_search_score(
                    s.tokens, s.cum_logprob, self.eos_token_ids, p.length_penalty
                ),
                reverse=True,
            )[: p.beam_width]
            for seq in ranked:
                seq.text = self._text(inst, seq)
            results.append(BeamSearchOutput(ranked))
        return results

    def _text(self, inst: _Instance, seq: BeamSearchSequence) -> str:
        generated = self.generated_token_ids(inst.prompt_token_ids, seq)
        if seq.finish_reason == "stop" and generated and generated[-1] in self.eos_token_ids:
            generated = generated[:-1]
        detok = IncrementalDetokenizer(self.tokenizer, inst.prompt_token_ids, [])
        detok.add_tokens(generated)
        detok.flush()
        return detok.text

    @staticmethod
    def generated_token_ids(prompt_token_ids: list[int], seq: BeamSearchSequence) -> list[int]:
        return seq.tokens[len(prompt_token_ids) :]

    def request_outputs(self, request_ids: Sequence[str]) -> list[RequestOutput]:
        """The results as finished RequestOutputs (one per prompt, its sequences as outputs)."""
        finals = []
        for rid, inst, out in zip(request_ids, self.instances, self.outputs(), strict=True):
            completions = [
                CompletionOutput(
                    index=i,
                    text=seq.text or "",
                    token_ids=self.generated_token_ids(inst.prompt_token_ids, seq),
                    cumulative_logprob=seq.cum_logprob,
                    logprobs=seq.logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
                for i, seq in enumerate(out.sequences)
            ]
            finals.append(RequestOutput(
                request_id=rid, prompt=None, prompt_token_ids=inst.prompt_token_ids,
                prompt_logprobs=None, outputs=completions, finished=True,
            ))
        return finals


def check_beam_width(beam_width: int, max_logprobs: int, name: str = "beam_width") -> None:
    """ValueError naming ``name`` unless the engine can report 2 * beam_width logprobs."""
    if 2 * beam_width > max_logprobs:
        raise ValueError(
            f"{name} ({beam_width}) is too large: beam search asks the engine for the "
            f"2 * {name} most likely tokens of every beam, and this engine reports at most "
            f"{max_logprobs} (--max-logprobs), so {name} must be <= {max_logprobs // 2}"
        )


def step_result(output: RequestOutput) -> StepResult:
    """The top logprobs of the one token an engine request of a step generated."""
    completion = output.outputs[0] if output.outputs else None
    if completion is None or not completion.logprobs:
        return None
    return completion.logprobs[0]


def run_beam_search(search: BeamSearch, step: StepFn) -> BeamSearch:
    """Run ``search`` to the end with a StepFn; returns ``search`` (see `BeamSearch.outputs`)."""
    while not search.done:
        search.advance(step(*search.pending()))
    return search


async def run_beam_search_async(search: BeamSearch, step: AsyncStepFn) -> BeamSearch:
    """`run_beam_search` with a coroutine ``step``."""
    while not search.done:
        search.advance(await step(*search.pending()))
    return search
