"""Backplane models against transformers (the numerical reference), float32.

Every architecture of the fixture set runs through the CPU platform's paged
attention backend: a whole-prompt prefill, a batch of two requests of
different lengths in one forward, prefill-then-decode, and a chunked prefill
mixed with a decode in the same step.
"""

from __future__ import annotations

import pytest
import torch

from backplane.config.configs import ModelConfig
from backplane.core.loader import load_model
from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from tests.fixtures.paged import PagedBatch
from tests.fixtures.tiny_models import ARCHS

ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded():
    """(arch) -> (backplane model, transformers model), cached for the module."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(path):
        if path not in cache:
            ours = load_model(ModelConfig(model=path), "cpu")
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[path] = ours, ref
        return cache[path]

    return get


def _prompt(length: int, seed: int) -> list[int]:
    # Ids past the tokenizer's special tokens, inside the tokenizer vocab.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 480, (length,), generator=g).tolist()


@torch.inference_mode()
def _ref_logits(ref, tokens: list[int]) -> torch.Tensor:
    return ref(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_prefill_matches_transformers(arch, tiny_model_factory, loaded):
    ours, ref = loaded(tiny_model_factory(arch))
    tokens = _prompt(37, seed=1)
    batch = PagedBatch(ours, CpuSdpaAttentionBackend, num_reqs=1, max_len=64)
    ids, pos, ctx = batch.step([0], [tokens])
    logits = ours.compute_logits(ours(ids, pos, ctx))
    assert logits.dtype == torch.float32 and logits.shape == (37, ours.dims.vocab_size)
    torch.testing.assert_close(logits, _ref_logits(ref, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_two_requests_in_one_batch(arch, tiny_model_factory, loaded):
    ours, ref = loaded(tiny_model_factory(arch))
    short, long = _prompt(9, seed=2), _prompt(40, seed=3)
    batch = PagedBatch(ours, CpuSdpaAttentionBackend, num_reqs=2, max_len=64)
    ids, pos, ctx = batch.step([0, 1], [short, long])
    logits = ours.compute_logits(ours(ids, pos, ctx))
    torch.testing.assert_close(logits[:9], _ref_logits(ref, short), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[9:], _ref_logits(ref, long), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_prefill_then_decode(arch, tiny_model_factory, loaded):
    ours, ref = loaded(tiny_model_factory(arch))
    tokens = _prompt(33, seed=4)
    batch = PagedBatch(ours, CpuSdpaAttentionBackend, num_reqs=1, max_len=64)
    ids, pos, ctx = batch.step([0], [tokens[:-1]])
    ours(ids, pos, ctx)
    ids, pos, ctx = batch.step([0], [tokens[-1:]])
    assert pos.tolist() == [32]
    last = ours.compute_logits(ours(ids, pos, ctx))[0]
    torch.testing.assert_close(last, _ref_logits(ref, tokens)[-1], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_chunked_prefill_mixed_with_decode(tiny_model_factory, loaded):
    """One step holding a decode token of request 0 and a later chunk of request 1."""
    ours, ref = loaded(tiny_model_factory("llama3_rope"))
    a, b = _prompt(20, seed=5), _prompt(50, seed=6)
    batch = PagedBatch(ours, CpuSdpaAttentionBackend, num_reqs=2, max_len=64)
    ids, pos, ctx = batch.step([0, 1], [a[:-1], b[:21]])  # b's first chunk
    ours(ids, pos, ctx)
    ids, pos, ctx = batch.step([0, 1], [a[-1:], b[21:]])  # decode a, rest of b
    logits = ours.compute_logits(ours(ids, pos, ctx))
    torch.testing.assert_close(logits[0], _ref_logits(ref, a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:], _ref_logits(ref, b)[21:], atol=ATOL, rtol=0)
