"""A stand-in for vllm in CI: `LLM.generate` returns output_len token ids per prompt at once.

Only what backplane/benchmarks/baselines/vllm_runner.py touches is here. It
records the LLM keyword arguments and the vLLM CPU variables it saw, so tests
can check what the runner passed."""

import json
import os

__version__ = "0.0.fake"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _Output:
    def __init__(self, token_ids):
        self.outputs = [_Completion(token_ids)]


class LLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        record = os.environ.get("FAKE_VLLM_RECORD")
        if record:
            with open(record, "w") as f:
                json.dump({"kwargs": kwargs,
                           "env": {k: v for k, v in os.environ.items()
                                   if k.startswith(("VLLM_", "OMP_NUM_THREADS"))}}, f)

    def generate(self, prompts, params, use_tqdm=False):
        assert len(prompts) == len(params)
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            assert p.ignore_eos and p.min_tokens == p.max_tokens
            assert all(isinstance(t, int) for t in prompt["prompt_token_ids"])
            out.append(_Output([7] * p.max_tokens))
        return out
