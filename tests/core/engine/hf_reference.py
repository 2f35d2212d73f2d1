"""Transformers as the numerical reference: greedy tokens and raw logprobs, step by step."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM


@functools.cache
def hf_model(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model_dir: str, prompt_ids: list[int], max_new_tokens: int):
    """Greedy continuation (EOS ignored) and the log_softmax row of each chosen token."""
    model = hf_model(model_dir)
    ids = list(prompt_ids)
    tokens, logprob_rows = [], []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprob_rows.append(torch.log_softmax(logits, dim=-1))
        ids.append(token)
    return tokens, logprob_rows


@torch.inference_mode()
def hf_prompt_logprobs(model_dir: str, prompt_ids: list[int]) -> torch.Tensor:
    """[len-1, vocab] log_softmax predicting prompt token i+1 from tokens <= i."""
    logits = hf_model(model_dir)(torch.tensor([prompt_ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)
