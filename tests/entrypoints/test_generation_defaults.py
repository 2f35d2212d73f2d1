"""The model's generation_config.json sampling defaults in the OpenAI server: they fill
the request fields a client leaves unset, explicit fields win, max_new_tokens is the
default max_tokens, and /v1/models shows them (vLLM's --generation-config)."""

from __future__ import annotations

import argparse

import pytest

from backplane.config.cli_args import add_engine_args, engine_args_from_cli
from backplane.core.engine.async_engine import AsyncEngine
from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import MAX_MODEL_LEN, start_server, tiny_engine_args
from tests.fixtures.generation_config import (
    GENERATION_DEFAULTS,
    SAMPLING_DEFAULTS,
    write_generation_config,
)

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def gen_server(llama_model_dir, tmp_path_factory):
    """The shared server's model (same weights) with sampling defaults in generation_config.json."""
    model_dir = write_generation_config(
        llama_model_dir, tmp_path_factory.mktemp("gen_server") / "model", **GENERATION_DEFAULTS
    )
    engine = AsyncEngine.from_engine_args(
        tiny_engine_args(model_dir, served_model_name=SERVED_NAME)
    )
    running = start_server(engine)
    yield running
    running.stop()


def _complete(server, **body) -> dict:
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": SERVED_NAME, "prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _chat(server, **body) -> dict:
    messages = [{"role": "user", "content": PROMPT}]
    with server.client() as c:
        r = c.post("/v1/chat/completions",
                   json={"model": SERVED_NAME, "messages": messages, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_show_the_defaults_in_force(gen_server, server):
    with gen_server.client() as c:
        card = c.get("/v1/models").json()["data"][0]
        assert c.get(f"/v1/models/{SERVED_NAME}").json()["generation_defaults"] == SAMPLING_DEFAULTS
    assert card["generation_defaults"] == SAMPLING_DEFAULTS  # max_new_tokens -> max_tokens
    with server.client() as c:  # a model without any: Backplane's own defaults
        assert c.get("/v1/models").json()["data"][0]["generation_defaults"] == {}


def test_unset_fields_take_the_defaults(gen_server, server):
    # The shared server has the same weights and no defaults: passing the values
    # explicitly there gives the same seeded tokens as leaving them unset here.
    for call in (_complete, _chat):
        defaulted = call(gen_server, seed=11, ignore_eos=True)
        explicit = call(server, seed=11, ignore_eos=True, **SAMPLING_DEFAULTS)
        assert defaulted["usage"]["completion_tokens"] == 6  # max_new_tokens
        assert defaulted["choices"][0] == explicit["choices"][0]
        plain = call(server, seed=11, ignore_eos=True, max_tokens=6)
        assert plain["choices"][0] != defaulted["choices"][0]


def test_explicit_request_fields_win(gen_server, server):
    own = dict(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=9)
    for call in (_complete, _chat):
        got = call(gen_server, seed=5, ignore_eos=True, **own)
        assert got["usage"]["completion_tokens"] == 9
        assert got["choices"][0] == call(server, seed=5, ignore_eos=True, **own)["choices"][0]
    # One field set, the others defaulted: temperature 0 (greedy) wins over 0.7.
    greedy = _complete(gen_server, temperature=0.0, ignore_eos=True)
    reference = _complete(server, ignore_eos=True, **{**SAMPLING_DEFAULTS, "temperature": 0.0})
    assert greedy["choices"][0] == reference["choices"][0]
    # max_completion_tokens (chat) wins over max_new_tokens too.
    assert _chat(gen_server, max_completion_tokens=8, ignore_eos=True)["usage"][
        "completion_tokens"] == 8


def test_default_max_tokens_fits_max_model_len(gen_server):
    long_prompt = [5] * (MAX_MODEL_LEN - 3)  # room for 3 tokens, the default asks for 6
    got = _complete(gen_server, prompt=long_prompt, ignore_eos=True)
    assert got["usage"]["completion_tokens"] == 3
    with gen_server.client() as c:  # an explicit max_tokens that does not fit is refused
        r = c.post("/v1/completions", json={"model": SERVED_NAME, "prompt": long_prompt,
                                            "max_tokens": 6})
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]


def test_cli_flags():
    parser = add_engine_args(argparse.ArgumentParser(), positional_model=True)
    args = engine_args_from_cli(parser.parse_args([
        "m", "--generation-config", "vllm",
        "--override-generation-config", '{"temperature": 0.5}',
    ]))
    assert args.generation_config == "vllm"
    assert args.override_generation_config == {"temperature": 0.5}
