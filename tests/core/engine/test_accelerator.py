"""The engine on an accelerator platform: every sampling feature runs on the device.

Skipped on machines without one (CI); run on a GPU machine with `-m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from backplane import LLM, SamplingParams
from tests.core.engine.conftest import PROMPTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device"),
]


def test_sampling_features_run_on_the_device(llama_model_dir):
    llm = LLM(model=llama_model_dir, device="cuda", max_model_len=256, num_kv_blocks=64,
              optimization_level=0)
    assert llm.llm_engine.platform.name == "cuda"
    cpu = LLM(model=llama_model_dir, device="cpu", max_model_len=256, num_kv_blocks=64)
    params = [
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2,
                       prompt_logprobs=1),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=20, min_p=0.01, seed=5, max_tokens=8,
                       ignore_eos=True, repetition_penalty=1.2, presence_penalty=0.5,
                       logit_bias={3: 2.0}),
        SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=8, ignore_eos=True,
                       min_tokens=2, frequency_penalty=0.3),
    ]
    first = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    again = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for a, b in zip(first, again, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    reference = cpu.generate(PROMPTS[:1], params[0], use_tqdm=False)[0]
    assert first[0].outputs[0].token_ids == reference.outputs[0].token_ids
    assert len(first[0].prompt_logprobs) == len(first[0].prompt_token_ids)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
