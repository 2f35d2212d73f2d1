from __future__ import annotations

import pytest

from backplane import LLM

PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "a",
    "once upon a time there was a small village by the sea where people told stories "
    "about the old lighthouse and the keeper who lived alone",
    "hello world",
]


@pytest.fixture(scope="module")
def llama_llm(llama_model_dir):
    return LLM(model=llama_model_dir, max_model_len=256, num_kv_blocks=128, max_num_seqs=8)
