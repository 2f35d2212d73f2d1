"""GPT-2 and OPT match transformers (float32): greedy tokens and logprobs.

Four fixtures (tests/fixtures/tiny_gpt.py) cover GPT-2 as published, GPT-2
with exact GELU / untied lm_head / per-layer score scaling, OPT-125m's shape
and OPT-350m's (post-norm, project_in/project_out). Norm weights and biases are
random, so a misplaced norm or bias shows up. Prefill is forced into chunks
(7 tokens a step) and the long prompt spans many 4-token KV blocks, so the
learned positions must follow each chunk's offset.

Checkpoint variants (GPT-2 exports without the ``transformer.`` prefix and
with mask buffers, OPT's ``decoder.*`` names) and the refusals are checked on
the loader directly.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.config.configs import ModelConfig
from backplane.core.loader import load_model
from backplane.core.models.base import WeightShapeError
from backplane.core.models.gpt2 import GPT2LMHeadModel
from backplane.core.models.opt import OPTForCausalLM
from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from tests.core.engine.conftest import PROMPTS
from tests.core.engine.hf_reference import hf_model, hf_prompt_logprobs
from tests.fixtures.paged import PagedBatch
from tests.fixtures.tiny_gpt import GPT_ARCHS, make_gpt_config, make_tiny_gpt

MAX_TOKENS = 8
# The long prompt (74 tokens: 11 prefill chunks, 19 KV blocks) batched with a short one.
BATCH = [PROMPTS[2], PROMPTS[0]]
TOP_K = 3
BLOCK_SIZE = 4
CHUNK = 7
ATOL = 1e-4


@pytest.fixture(scope="module")
def gpt_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gpt")
    return {arch: make_tiny_gpt(root / arch, arch) for arch in GPT_ARCHS}


@torch.inference_mode()
def reference_generate(model_dir: str, prompt_ids: list[int]):
    """transformers' greedy `generate` (EOS suppressed) and each step's log_softmax row."""
    result = hf_model(model_dir).generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
        output_logits=True, return_dict_in_generate=True,
    )
    steps = [torch.log_softmax(row[0].float(), dim=-1) for row in result.logits]
    return result.sequences[0, len(prompt_ids):].tolist(), steps


def _assert_top_logprobs(entry, row, context) -> None:
    values, ids = row.topk(TOP_K)
    for tid, value in zip(ids.tolist(), values.tolist(), strict=True):
        assert math.isclose(entry[tid].logprob, value, abs_tol=ATOL), context


@pytest.mark.parametrize("arch", GPT_ARCHS)
def test_chunked_greedy_and_logprobs_match_generate(gpt_dirs, arch):
    model_dir = gpt_dirs[arch]
    llm = LLM(model=model_dir, max_model_len=256, num_kv_blocks=96, block_size=BLOCK_SIZE,
              max_num_batched_tokens=CHUNK)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=TOP_K, prompt_logprobs=0)
    outputs = llm.generate(BATCH, greedy, use_tqdm=False)
    assert max(len(o.prompt_token_ids) for o in outputs) > max(4 * CHUNK, 8 * BLOCK_SIZE)
    for prompt, out in zip(BATCH, outputs, strict=True):
        ids, completion = out.prompt_token_ids, out.outputs[0]
        expected, rows = reference_generate(model_dir, ids)
        assert completion.token_ids == expected, (arch, prompt)
        for token, entry, row in zip(expected, completion.logprobs, rows, strict=True):
            assert entry[token].rank == 1
            _assert_top_logprobs(entry, row, (arch, prompt))
        prompt_rows = hf_prompt_logprobs(model_dir, ids)
        got = torch.tensor([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:],
                                                          strict=True)])
        want = prompt_rows.gather(1, torch.tensor(ids[1:])[:, None]).flatten()
        assert torch.allclose(got, want, atol=ATOL), (arch, prompt)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"


@pytest.mark.parametrize(("arch", "overrides"), [
    ("opt", {"enable_bias": False, "layer_norm_elementwise_affine": False}),
    ("opt", {"activation_function": "gelu_new", "_remove_final_layer_norm": True}),
    ("gpt2", {"activation_function": "quick_gelu", "scale_attn_weights": False}),
])
@torch.inference_mode()
def test_config_switches_match_transformers_logits(tmp_path, arch, overrides):
    """Switches the four fixtures leave at one value: one paged prefill, all logits."""
    model_dir = make_tiny_gpt(tmp_path / arch, arch, **overrides)
    ours = load_model(ModelConfig(model=model_dir), "cpu")
    tokens = list(range(6, 43))
    batch = PagedBatch(ours, CpuSdpaAttentionBackend, num_reqs=1, max_len=64,
                       block_size=BLOCK_SIZE)
    logits = ours.compute_logits(ours(*batch.step([0], [tokens])))
    reference = hf_model(model_dir)(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)


def _rewrite_checkpoint(src: str, dst: str, rename, extra=None) -> str:
    """A copy of model dir ``src`` whose tensors are renamed (and extended by ``extra``)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {rename(name): f.get_tensor(name) for name in f.keys()}
    save_file({**tensors, **(extra or {})}, path, metadata={"format": "pt"})
    return dst


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_old_style_checkpoint_names_load(gpt_dirs, tmp_path):
    gpt2 = gpt_dirs["gpt2"]
    mask = {f"h.{i}.attn.{n}": torch.ones(1) for i in range(2) for n in ("bias", "masked_bias")}
    old_gpt2 = _rewrite_checkpoint(gpt2, tmp_path / "gpt2-old",
                                   lambda n: n.removeprefix("transformer."), mask)
    opt = gpt_dirs["opt"]
    old_opt = _rewrite_checkpoint(opt, tmp_path / "opt-old", lambda n: n.removeprefix("model."))
    for new, old in ((gpt2, old_gpt2), (opt, old_opt)):
        assert _same_weights(load_model(ModelConfig(model=new), "cpu"),
                             load_model(ModelConfig(model=os.fspath(old)), "cpu"))


def test_gpt2_errors_use_checkpoint_names(gpt_dirs):
    model = load_model(ModelConfig(model=gpt_dirs["gpt2"]), "cpu")
    assert "transformer.h.1.attn.c_attn.weight" in model.expected_weight_names()
    # A Conv1D weight stored like nn.Linear ([out, in]) is refused in GPT-2's terms.
    with pytest.raises(WeightShapeError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight") as err:
        model.load_weights([("transformer.h.0.mlp.c_fc.weight", torch.zeros(128, 64))])
    assert err.value.expected == (64, 128) and err.value.got == (128, 64)


@pytest.mark.parametrize(("model_cls", "arch", "overrides", "message"), [
    (GPT2LMHeadModel, "gpt2", {"activation_function": "swiglu"}, "'swiglu' is not supported"),
    (GPT2LMHeadModel, "gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    (OPTForCausalLM, "opt", {"activation_function": "tanh"}, "'tanh' is not supported"),
])
def test_unsupported_configs_are_refused(model_cls, arch, overrides, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        model_cls(make_gpt_config(arch, **overrides))
