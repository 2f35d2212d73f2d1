#!/usr/bin/env python3
"""llama.cpp's speculative examples on the workload of `backplane bench speculative`.

A reproducibility script for docs/benchmarks.md (CI never runs it). It needs a
llama.cpp source tree and a build of its examples, e.g. from the
`llama-cpp-python` sdist (which vendors llama.cpp)::

    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp
    SRC=$(echo /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp)
    cmake -B /tmp/lcp/build -G Ninja -S $SRC -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build /tmp/lcp/build -j2 --target llama-speculative llama-lookup llama-bench
    python scripts/llamacpp_speculative.py --src $SRC --bin /tmp/lcp/build/bin \\
        --model /tmp/qwen05 [--draft /tmp/qwen05-draft] --out /tmp/gguf

It converts the Hugging Face directories to GGUF with llama.cpp's own converter
(tokenizers it does not know by hash are declared "default": the benchmark
models' tokenizers are trained locally), then runs, with the same threads and
the copy workload's prompts (greedy, EOS ignored):

- ``llama-bench -p 0 -n N``: plain batch-1 decode tokens/s;
- ``llama-lookup --draft K``: prompt-lookup (n-gram) speculation;
- ``llama-speculative -md DRAFT --draft K``: draft-model speculation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from backplane.benchmarks.speculative import PASSAGES  # noqa: E402


def convert(src: str, model_dir: str, out_path: str, outtype: str) -> str:
    """GGUF of ``model_dir`` at ``out_path`` (skipped when it exists)."""
    if os.path.exists(out_path):
        return out_path
    code = f"""
import sys
sys.path[:0] = [{src!r}, {os.path.join(src, 'gguf-py')!r}]
import conversion.base as base
original = base.TextModel.get_vocab_base_pre
def tolerant(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return "default"  # a locally trained tokenizer: no known pre-tokenizer hash
base.TextModel.get_vocab_base_pre = tolerant
sys.argv = ["convert_hf_to_gguf.py", {model_dir!r}, "--outfile", {out_path!r},
            "--outtype", {outtype!r}]
import runpy
runpy.run_path({os.path.join(src, 'convert_hf_to_gguf.py')!r}, run_name="__main__")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out_path


def _number(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def copy_prompts(num: int) -> list[str]:
    """The copy workload of `bench speculative` (passage, passage, first quarter)."""
    prompts = []
    for i in range(num):
        passage = PASSAGES[i % len(PASSAGES)]
        words = passage.split()
        prompts.append(f"{passage}\n{passage}\n{' '.join(words[: len(words) // 4])}")
    return prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="llama.cpp source tree")
    parser.add_argument("--bin", required=True, help="directory of the built examples")
    parser.add_argument("--model", required=True, help="target Hugging Face directory")
    parser.add_argument("--draft", help="draft Hugging Face directory (same tokenizer)")
    parser.add_argument("--out", required=True, help="where the GGUF files go")
    parser.add_argument("--outtype", default="bf16", help="GGUF weight type [bf16]")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.model))
    target = convert(args.src, args.model, os.path.join(args.out, f"{name}.gguf"), args.outtype)
    draft = None
    if args.draft:
        draft_name = os.path.basename(os.path.normpath(args.draft))
        draft = convert(args.src, args.draft, os.path.join(args.out, f"{draft_name}.gguf"),
                        args.outtype)
    common = ["-t", str(args.threads), "--temp", "0", "--ignore-eos", "-n",
              str(args.output_len), "-c", "2048"]
    result: dict = {"model": args.model, "threads": args.threads, "k": args.k}
    text = run([os.path.join(args.bin, "llama-bench"), "-m", target, "-p", "0", "-n",
                str(args.output_len), "-t", str(args.threads), "-o", "json"])
    result["plain_tokens_per_s"] = json.loads(text[text.index("["):])[0]["avg_ts"]

    def speculate(label: str, extra: list[str], binary: str) -> None:
        speeds, drafted, accepted = [], 0, 0
        for prompt in copy_prompts(args.num_prompts):
            out = run([os.path.join(args.bin, binary), "-m", target, "-p", prompt,
                       "--spec-draft-n-max", str(args.k)] + extra + common)
            speeds.append(_number(r"decoded.*speed:\s*([\d.]+) t/s", out))
            drafted += int(_number(r"n_drafted\s*=\s*(\d+)", out) or 0)
            accepted += int(_number(r"n_accept\s*=\s*(\d+)", out) or 0)
        result[label] = {"tokens_per_s": sum(speeds) / len(speeds),
                         "acceptance_rate": accepted / drafted if drafted else 0.0}

    speculate("lookup", [], "llama-lookup")
    if draft:
        speculate("draft_model", ["-md", draft], "llama-speculative")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
