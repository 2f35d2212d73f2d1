"""Beam search (`LLM.beam_search`, `backplane.beam_search`): vLLM's algorithm on the engine."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from backplane import BeamSearchParams, SamplingParams
from backplane.beam_search import BeamSearch, get_beam_search_score, run_beam_search
from backplane.outputs import Logprob
from tests.core.engine.conftest import PROMPTS
from tests.core.engine.hf_reference import hf_model


def _greedy(llm, prompt, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    return llm.generate([prompt], params, use_tqdm=False)[0]


def _generated(llm, prompt, seq):
    return seq.tokens[len(llm.llm_engine.tokenize_prompt(prompt)[1]):]


def _assert_all_blocks_free(llm):
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.llm_engine.has_unfinished_requests()


def test_beam_width_one_is_greedy(llama_llm):
    params = BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True)
    outputs = llama_llm.beam_search(PROMPTS[:2], params)
    for prompt, out in zip(PROMPTS[:2], outputs, strict=True):
        (seq,) = out.sequences
        greedy = _greedy(llama_llm, prompt, 8).outputs[0]
        assert _generated(llama_llm, prompt, seq) == greedy.token_ids
        assert seq.text == greedy.text
        assert math.isclose(seq.cum_logprob, greedy.cumulative_logprob, abs_tol=1e-4)
        assert seq.finish_reason == "length" and len(seq.logprobs) == 8
    _assert_all_blocks_free(llama_llm)


def test_wider_beam_finds_at_least_the_greedy_score_and_ranks_its_sequences(llama_llm):
    prompt = PROMPTS[0]
    greedy = _greedy(llama_llm, prompt, 6).outputs[0]
    for params in (
        BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True),
        BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5),
    ):
        (out,) = llama_llm.beam_search(prompt, params)
        assert len(out.sequences) == params.beam_width
        best = out.sequences[0]
        if params.ignore_eos:  # same length as greedy: cumulative logprobs compare directly
            assert best.cum_logprob >= greedy.cumulative_logprob - 1e-5
        eos = llama_llm.llm_engine.eos_token_ids
        scores = [get_beam_search_score(s.tokens, s.cum_logprob, eos, params.length_penalty)
                  for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(s.tokens) for s in out.sequences}) == len(out.sequences)
        for seq in out.sequences:  # cum_logprob is the sum of the chosen tokens' logprobs
            chosen = _generated(llama_llm, prompt, seq)
            if len(chosen) < len(seq.logprobs):  # finished by an EOS not kept in tokens
                chosen.append(next(t for t in eos if t in seq.logprobs[-1]))
            total = sum(entry[t].logprob for entry, t in zip(seq.logprobs, chosen, strict=True))
            assert math.isclose(seq.cum_logprob, total, abs_tol=1e-4)
    _assert_all_blocks_free(llama_llm)


def test_matches_transformers_beam_search(llama_llm, llama_model_dir):
    """Without EOS in play, vLLM's and transformers' beam search are the same search."""
    width, steps = 4, 6
    prompt_ids = llama_llm.llm_engine.tokenize_prompt(PROMPTS[3])[1]
    with torch.inference_mode():
        reference = hf_model(llama_model_dir).generate(
            torch.tensor([prompt_ids]), num_beams=width, num_return_sequences=width,
            do_sample=False, max_new_tokens=steps, length_penalty=1.0, early_stopping=False,
            pad_token_id=3, output_scores=True, return_dict_in_generate=True,
        )
    expected = reference.sequences[:, len(prompt_ids):].tolist()
    eos = llama_llm.llm_engine.eos_token_ids
    # The precondition: no EOS anywhere, so both run every beam to max_new_tokens
    assert not any(t in eos for seq in expected for t in seq)
    params = BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True)
    (out,) = llama_llm.beam_search({"prompt_token_ids": prompt_ids}, params)
    got = [seq.tokens[len(prompt_ids):] for seq in out.sequences]
    assert got[0] == expected[0]
    assert got == expected
    # transformers' sequences_scores = cum_logprob / generated length ** length_penalty
    for seq, score in zip(out.sequences, reference.sequences_scores.tolist(), strict=True):
        assert math.isclose(seq.cum_logprob / steps, score, abs_tol=1e-4)


def test_prompt_forms_agree_and_prompts_are_batched_independently(llama_llm):
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    ids = llama_llm.llm_engine.tokenize_prompt(PROMPTS[0])[1]
    forms = [PROMPTS[0], ids, {"prompt": PROMPTS[0]}, {"prompt_token_ids": ids},
             {"prompt": PROMPTS[0], "cache_salt": "s"}]
    together = llama_llm.beam_search([*forms, PROMPTS[1]], params)
    alone = llama_llm.beam_search(PROMPTS[1], params)[0]
    first = [s.tokens for s in together[0].sequences]
    for out in together[1:-1]:
        assert [s.tokens for s in out.sequences] == first
    assert [s.tokens for s in together[-1].sequences] == [s.tokens for s in alone.sequences]
    assert [s.text for s in together[-1].sequences] == [s.text for s in alone.sequences]
    _assert_all_blocks_free(llama_llm)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(beam_width=0, max_tokens=4), "beam_width"),
        (dict(beam_width=True, max_tokens=4), "beam_width"),
        (dict(beam_width=2, max_tokens=0), "max_tokens"),
        (dict(beam_width=2, max_tokens=4, temperature=-1.0), "temperature"),
        (dict(beam_width=2, max_tokens=4, length_penalty=math.inf), "length_penalty"),
        (dict(beam_width=2, max_tokens=4, ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_params_are_validated_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        BeamSearchParams(**kwargs)


def test_beam_search_refuses_what_the_engine_cannot_do(llama_llm):
    with pytest.raises(ValueError, match=r"beam_width \(11\).*max-logprobs.*<= 10"):
        llama_llm.beam_search("hello", BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(ValueError, match="max_tokens .* exceeds max_model_len"):
        llama_llm.beam_search("hello", BeamSearchParams(beam_width=2, max_tokens=1000))
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llama_llm.beam_search("hello", SamplingParams())
    _assert_all_blocks_free(llama_llm)


# ----- the algorithm against brute force, on a toy model with a tiny vocabulary -----

VOCAB, EOS = 4, 3


def _toy_step(table):
    """A StepFn whose next-token logprobs depend on the last token and the position."""
    def step(prompts, params):
        results = []
        for prompt, _ in zip(prompts, params, strict=True):
            tokens = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
            row = table[(tokens[-1], len(tokens))]
            results.append({t: Logprob(lp) for t, lp in enumerate(row)})
        return results
    return step


def _toy_table(seed):
    rng = random.Random(seed)
    table = {}
    for last, pos in itertools.product(range(VOCAB), range(1, 8)):
        logits = [rng.gauss(0, 1.5) for _ in range(VOCAB)]
        norm = math.log(sum(math.exp(x) for x in logits))
        table[(last, pos)] = [x - norm for x in logits]
    return table


def _brute_force(table, prompt, params):
    """Every sequence the search could end with, scored as vLLM does; the best first."""
    finished = []
    for length in range(1, params.max_tokens + 1):
        for gen in itertools.product(range(VOCAB), repeat=length):
            stops_early = not params.ignore_eos and EOS in gen[:-1]
            ends_with_eos = not params.ignore_eos and gen[-1] == EOS
            if stops_early or (length < params.max_tokens and not ends_with_eos):
                continue
            tokens, cum = list(prompt), 0.0
            for t in gen:
                cum += table[(tokens[-1], len(tokens))][t]
                tokens.append(t)
            if ends_with_eos and not params.include_stop_str_in_output:
                tokens.pop()
            score = get_beam_search_score(tokens, cum, {EOS}, params.length_penalty)
            finished.append((score, tokens, "stop" if ends_with_eos else "length"))
    finished.sort(key=lambda f: f[0], reverse=True)
    return finished[: params.beam_width]


@pytest.mark.parametrize(
    "params",
    [
        # Wide enough that no beam is ever pruned: beam search is then exhaustive.
        BeamSearchParams(beam_width=9, max_tokens=3),
        BeamSearchParams(beam_width=9, max_tokens=3, length_penalty=0.0),
        BeamSearchParams(beam_width=9, max_tokens=3, length_penalty=2.0,
                         include_stop_str_in_output=True),
        BeamSearchParams(beam_width=4, max_tokens=2, ignore_eos=True),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exhaustive_beam_equals_brute_force(params, seed):
    table = _toy_table(seed)
    prompt = [0, 1]
    search = BeamSearch([(prompt, "salt")], params, {EOS}, tokenizer=_NoText())
    (out,) = run_beam_search(search, _toy_step(table)).outputs()
    expected = _brute_force(table, prompt, params)
    assert [s.tokens for s in out.sequences] == [tokens for _, tokens, _ in expected]
    assert [s.finish_reason for s in out.sequences] == [reason for _, _, reason in expected]
    scores = [get_beam_search_score(s.tokens, s.cum_logprob, {EOS}, params.length_penalty)
              for s in out.sequences]
    assert scores == pytest.approx([score for score, _, _ in expected])


def test_narrow_beam_prunes_to_the_best_live_candidates():
    table = _toy_table(3)
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    search = BeamSearch([[0]], params, {EOS}, tokenizer=_NoText())
    step = _toy_step(table)
    for _ in range(2):
        before = [list(b.tokens) for b in search.instances[0].beams]
        cums = {tuple(b.tokens): b.cum_logprob for b in search.instances[0].beams}
        search.advance(step(*search.pending()))
        candidates = sorted(
            (cums[tuple(b)] + table[(b[-1], len(b))][t], [*b, t])
            for b in before for t in range(VOCAB)
        )[::-1][:2]
        assert [b.tokens for b in search.instances[0].beams] == [c[1] for c in candidates]


class _NoText:
    """A tokenizer stand-in for toy token ids."""

    def decode(self, ids, **_):
        return "".join(chr(ord("a") + i) for i in ids)
