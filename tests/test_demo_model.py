"""The bundled demo model: shipped files, offline loading, English output, engine parity.

The model is the one `backplane serve` runs when no MODEL is given (see
docs/demo_model.md). These tests load the committed files only; nothing is
trained or downloaded here.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from fnmatch import fnmatch

import pytest
import torch

from backplane.demo_model import default_model_path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small list of very common English words (function words and everyday verbs
# and nouns). Text from a model that emits random tokens, or fragments of words,
# hits it rarely; ordinary English prose hits it for well over half its words.
COMMON_WORDS = set(
    """
    a about after again against all also am an and any are as at away be because been
    before being between both but by came can come could day days did do does done down
    each even ever every for from gave give go god good great had has have he her here him
    his how i if in into is it its just king know land let life like little long lord made
    make man many may me men more most much must my never new no nor not now of off on
    once one only or other our out over own people said same saw say see shall she should
    so some son sons such take than that the their them then there these they thing things
    this those through time to too two under until up upon us very was water way we went
    were what when where which while who whole why will with word words would year years
    yet you your said says hand hands house heart heaven earth city cities day night great
    behold come came went go brought took give given hear heard spoke speak tell told
    fire sea sun light darkness eyes face servant servants father mother brother children
    wise wisdom good evil name names days nations people place places way ways
    """.split()
)

PROMPTS = ["In the beginning", "The king said to his servants,", "What is wisdom?"]


@pytest.fixture(scope="module")
def model_dir() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    """(tokenizer, float32 model) loaded strictly offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    model.eval()
    return tok, model


def _hf_greedy(hf_model, ids: list[int], max_new_tokens: int) -> list[int]:
    tok, model = hf_model
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


def test_shipped_files_and_config(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(model_dir, name)), name
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    size = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    assert size <= 20 * 1024 * 1024, f"demo weights are {size} bytes, over the 20 MiB budget"


def test_weights_are_bf16_llama_tensors(model_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        names = list(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert dtypes == {"BF16"}
    assert "model.embed_tokens.weight" in names
    assert any(n.startswith("model.layers.5.mlp.") for n in names)


def test_package_data_globs_ship_every_file(model_dir):
    # The wheel only carries files matched by [tool.setuptools.package-data].
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    patterns = globs.get("*", []) + globs.get("backplane.demo_model", [])
    for name in os.listdir(model_dir):
        if name.endswith((".py", ".pyc")) or name == "__pycache__":
            continue
        assert any(fnmatch(name, p) for p in patterns), f"{name} is not package data"


def test_tokenizer_specials_and_chat_template(hf_model):
    tok, _ = hf_model
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tok("Hello world").input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "Hello world"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    chat_ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert chat_ids.count(tok.bos_token_id) == 1


def _english_fraction(text: str) -> float:
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 10, f"too few words generated: {text!r}"
    return sum(w in COMMON_WORDS for w in words) / len(words)


def test_greedy_output_is_english(hf_model):
    tok, _ = hf_model
    texts = []
    for prompt in PROMPTS:
        new = _hf_greedy(hf_model, tok(prompt).input_ids, 32)
        texts.append(tok.decode(new, skip_special_tokens=True))
    fraction = _english_fraction(" ".join(texts))
    assert fraction >= 0.5, f"only {fraction:.0%} common English words in {texts}"


def test_chat_reply_closes_with_eos(hf_model):
    tok, _ = hf_model
    for question in ("Hello! Who are you?", "Tell me a story about a shepherd."):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        new = _hf_greedy(hf_model, ids, 64)
        assert tok.eos_token_id in new, f"no EOS in reply to {question!r}: {tok.decode(new)!r}"
        reply = tok.decode(new[: new.index(tok.eos_token_id)])
        assert re.search(r"[A-Za-z]{2,}", reply), reply


def test_backplane_greedy_matches_transformers(model_dir, hf_model):
    from backplane import LLM, SamplingParams

    tok, _ = hf_model
    llm = LLM(model=model_dir, dtype="float32", max_model_len=128, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    outputs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS[:2], outputs, strict=True):
        ids = tok(prompt).input_ids
        assert list(out.prompt_token_ids) == ids
        assert list(out.outputs[0].token_ids) == _hf_greedy(hf_model, ids, 16), prompt

    chat = llm.chat(
        [{"role": "user", "content": "Hello! Who are you?"}],
        SamplingParams(temperature=0.0, max_tokens=32),
        use_tqdm=False,
    )[0]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello! Who are you?"}],
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    assert list(chat.prompt_token_ids) == ids
    expected = _hf_greedy(hf_model, ids, 32)
    expected = expected[: expected.index(tok.eos_token_id) + 1]
    assert list(chat.outputs[0].token_ids) == expected
    assert chat.outputs[0].finish_reason == "stop"
