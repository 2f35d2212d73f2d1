"""The decoder model's stack-runner hook (plugins_sdk.decoder_block): a platform's
runner for all the decoder layers at once is tried first, its result used, and a None
falls back to the layers one by one."""

from __future__ import annotations

import torch

from backplane import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 11)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_stack_runner_is_tried_first_and_none_falls_back(tiny_model_factory):
    # float32: no platform sets a runner of its own here
    llm = LLM(model=tiny_model_factory("llama"), max_model_len=64, num_kv_blocks=16)
    model = llm.llm_engine.engine_core.model_runner.model.model
    assert type(model).layer_kind == "decoder_stack" and model.stack_runner is None
    want = _generate(llm)
    calls = []

    def declining(hidden, cos, sin, ctx):
        calls.append(hidden.shape[0])
        return None

    model.set_stack_runner(declining)
    assert _generate(llm) == want and calls  # tried every step, declined every step

    def layer_by_layer(hidden, cos, sin, ctx):
        calls.append(-1)
        for layer in model.layers:
            hidden = layer(hidden, cos, sin, ctx)
        return hidden

    calls.clear()
    model.set_stack_runner(layer_by_layer)
    assert _generate(llm) == want and calls and set(calls) == {-1}

    # the runner's result is what the final norm and the head see
    model.set_stack_runner(lambda hidden, cos, sin, ctx: torch.zeros_like(hidden))
    assert _generate(llm) != want
    model.set_stack_runner(None)
    assert _generate(llm) == want
