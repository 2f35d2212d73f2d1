"""LoRA adapters through the OpenAI server: --lora-modules, /v1/models, and the runtime
/v1/load_lora_adapter and /v1/unload_lora_adapter routes."""

from __future__ import annotations

import asyncio
import logging

import httpx
import openai
import pytest

pytest.importorskip("peft")

from backplane.config.server_options import (  # noqa: E402
    ServerOptions,
    parse_lora_modules,
    resolve_server_options,
)
from backplane.core.engine.async_engine import AsyncEngine  # noqa: E402
from backplane.entrypoints.cli.main import build_parser  # noqa: E402
from backplane.entrypoints.llm import LLM  # noqa: E402
from backplane.entrypoints.openai.api_server import build_app  # noqa: E402
from backplane.lora import LoRARequest  # noqa: E402
from backplane.sampling_params import SamplingParams  # noqa: E402
from tests.entrypoints.server_utils import (  # noqa: E402
    API_KEY,
    MAX_MODEL_LEN,
    start_server,
    tiny_engine_args,
)
from tests.fixtures.tiny_lora import make_tiny_lora  # noqa: E402

PROMPTS = ["The capital of France is", "one two three four"]
MAX_TOKENS = 8
LORA = dict(enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=2)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, llama_model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "sql": make_tiny_lora(root / "sql", llama_model_dir, rank=4, seed=1),
        "poem": make_tiny_lora(root / "poem", llama_model_dir, rank=8, seed=2),
    }


@pytest.fixture(scope="module")
def offline(llama_model_dir, adapters) -> dict[str | None, list[str]]:
    """Greedy texts of the offline LLM per adapter (None: the base model)."""
    llm = LLM(llama_model_dir, max_model_len=MAX_MODEL_LEN, num_kv_blocks=160, block_size=16,
              seed=0, **LORA)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want: dict[str | None, list[str]] = {}
    for i, name in enumerate([None, *adapters]):
        lora = None if name is None else LoRARequest(name, i, adapters[name])
        outs = llm.generate(PROMPTS, params, lora_request=lora)
        want[name] = [o.outputs[0].text for o in outs]
    return want


@pytest.fixture(scope="module")
def server(llama_model_dir, adapters):
    engine = AsyncEngine.from_engine_args(
        tiny_engine_args(llama_model_dir, served_model_name="tiny", **LORA))
    opts = ServerOptions(
        lora_modules=[f"sql={adapters['sql']}",
                      f'{{"name": "poem", "path": "{adapters["poem"]}"}}'],
        allow_runtime_lora_updating=True,
    )
    running = start_server(engine, options=opts)
    yield running
    running.stop()


def _client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


async def _complete(client, model: str) -> list[str]:
    r = await client.completions.create(model=model, prompt=PROMPTS, max_tokens=MAX_TOKENS,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert r.model == model
    return [c.text for c in sorted(r.choices, key=lambda c: c.index)]


def test_each_adapter_serves_what_the_offline_engine_generates(server, offline):
    async def main():
        client = _client(server)
        async with client:
            names = ["tiny", "sql", "poem"] * 2  # concurrent, so batches mix adapters
            return await asyncio.gather(*(_complete(client, n) for n in names))

    results = asyncio.run(main())
    for name, got in zip(["tiny", "sql", "poem"] * 2, results, strict=True):
        assert got == offline[None if name == "tiny" else name], name
    assert offline["sql"] != offline[None] and offline["poem"] != offline[None]
    assert offline["sql"] != offline["poem"]


def test_chat_responses_and_beam_search_use_the_adapter(server):
    msg = "Say something"

    async def main():
        async with _client(server) as client:
            chats = await asyncio.gather(*(
                client.chat.completions.create(
                    model=m, messages=[{"role": "user", "content": msg}], max_tokens=MAX_TOKENS,
                    temperature=0, extra_body={"ignore_eos": True})
                for m in ("tiny", "sql")))
            resp = await client.responses.create(model="sql", input=msg,
                                                 max_output_tokens=MAX_TOKENS, temperature=0)
            beam = await client.completions.create(
                model="poem", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=1,
                extra_body={"use_beam_search": True, "ignore_eos": True})
            greedy = await client.completions.create(
                model="poem", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"ignore_eos": True})
            return chats, resp, beam, greedy

    chats, resp, beam, greedy = asyncio.run(main())
    base_chat, sql_chat = (c.choices[0].message.content for c in chats)
    assert chats[1].model == "sql" and base_chat != sql_chat
    # The same conversation: the same greedy text (up to an end of sequence).
    assert resp.model == "sql" and sql_chat.startswith(resp.output_text)
    assert beam.model == "poem" and beam.choices[0].text == greedy.choices[0].text


def test_models_lists_the_adapters_with_their_parent(server, adapters):
    with server.client() as c:
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        one = c.get("/v1/models/sql").json()
    assert list(cards) == ["tiny", "sql", "poem"]
    assert cards["tiny"]["parent"] is None
    for name in ("sql", "poem"):
        assert cards[name]["parent"] == "tiny" and cards[name]["root"] == adapters[name]
    assert one["id"] == "sql" and one["parent"] == "tiny"


def test_load_use_and_unload_at_runtime(server, adapters, offline, tmp_path):
    with server.client() as c:
        no_key = httpx.post(server.url + "/v1/load_lora_adapter",
                            json={"lora_name": "x", "lora_path": adapters["sql"]})
        assert no_key.status_code == 401
        # The sql adapter's files under a new name: a new adapter that generates the same.
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "dyn", "lora_path": adapters["sql"]})
        assert r.status_code == 200 and "dyn" in r.text
        assert "dyn" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        body = {"model": "dyn", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert [ch["text"] for ch in r.json()["choices"]] == offline["sql"]
        # Refusals: a taken name, a served model name, a path with no adapter.
        for bad in ({"lora_name": "dyn", "lora_path": adapters["poem"]},
                    {"lora_name": "tiny", "lora_path": adapters["poem"]},
                    {"lora_name": "nothing", "lora_path": str(tmp_path / "missing")}):
            r = c.post("/v1/load_lora_adapter", json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["message"]
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "dyn"})
        assert r.status_code == 200 and "dyn" in r.text
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "dyn"}).status_code == 404
        assert "nothing" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
        # The server keeps serving after the refusals.
        r = c.post("/v1/completions", json=dict(body, model="sql"))
        assert r.status_code == 200 and [ch["text"] for ch in r.json()["choices"]] == offline["sql"]


def test_max_lora_rank_refuses_a_larger_adapter_at_load(server, llama_model_dir, tmp_path):
    big = make_tiny_lora(tmp_path / "big", llama_model_dir, rank=16, seed=3)
    with server.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": big})
        assert r.status_code == 400 and "rank" in r.json()["error"]["message"], r.text
        assert "big" not in [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_max_cpu_loras_bounds_the_adapters_kept_in_host_memory(server, adapters, caplog):
    """Three adapters used in turn with max_cpu_loras=2: one leaves the host cache."""
    with caplog.at_level(logging.INFO, logger="backplane.core.lora"), server.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "third",
                                                  "lora_path": adapters["poem"]})
        assert r.status_code == 200, r.text
        try:
            for name in ("sql", "poem", "third"):
                r = c.post("/v1/completions", json={"model": name, "prompt": "hi",
                                                    "max_tokens": 2})
                assert r.status_code == 200, r.text
        finally:
            c.post("/v1/unload_lora_adapter", json={"lora_name": "third"})
    assert "max_cpu_loras=2" in caplog.text


def test_load_routes_need_the_switch_and_modules_need_enable_lora(llama_model_dir, adapters,
                                                                  server, tmp_path):
    plain = start_server(AsyncEngine.from_engine_args(
        tiny_engine_args(llama_model_dir, served_model_name="tiny")))
    try:
        with plain.client() as c:
            body = {"lora_name": "x", "lora_path": adapters["sql"]}
            assert c.post("/v1/load_lora_adapter", json=body).status_code == 404
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 404
            r = c.post("/v1/completions", json={"model": "sql", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 404
        with pytest.raises(ValueError, match="--enable-lora"):
            build_app(plain.engine, options=ServerOptions(lora_modules=[f"a={adapters['sql']}"]),
                      shutdown_engine_on_exit=False)
    finally:
        plain.stop()
    # A bad adapter at start-up fails the start, naming it (the LoRA engine is reused).
    with pytest.raises(ValueError, match="'broken'"):
        build_app(server.engine, shutdown_engine_on_exit=False,
                  options=ServerOptions(lora_modules=[f"broken={tmp_path / 'nope'}"]))
    with pytest.raises(ValueError, match="served model name"):
        build_app(server.engine, shutdown_engine_on_exit=False,
                  options=ServerOptions(lora_modules=[f"tiny={adapters['sql']}"]))


def test_lora_flags_spellings_and_environment(monkeypatch):
    parser = build_parser()
    args = parser.parse_args([
        "serve", "m", "--enable-lora", "--lora-modules", "a=/x",
        '{"name": "b", "path": "/y", "base_model_name": "base"}',
    ])
    opts = resolve_server_options(args)
    assert [(m.name, m.path, m.base_model_name) for m in parse_lora_modules(opts.lora_modules)] \
        == [("a", "/x", None), ("b", "/y", "base")]
    assert not opts.allow_runtime_lora_updating
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    assert resolve_server_options(args).allow_runtime_lora_updating
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    monkeypatch.setenv("BACKPLANE_ALLOW_RUNTIME_LORA_UPDATING", "1")
    assert resolve_server_options(args).allow_runtime_lora_updating
    off = parser.parse_args(["serve", "m", "--no-allow-runtime-lora-updating"])
    assert not resolve_server_options(off).allow_runtime_lora_updating  # the flag wins
    # YAML may hold the JSON form as a mapping.
    from_file = resolve_server_options(parser.parse_args(["serve", "m"]),
                                       {"lora_modules": [{"name": "c", "path": "/z"}]})
    assert parse_lora_modules(from_file.lora_modules)[0].name == "c"
    for bad in (["noequals"], ["=/p"], ["a="], ['{"name": "a"}'], ["a=/x", "a=/y"],
                ['{"name": "a", "path": "/x", "rank": 4}']):
        with pytest.raises(ValueError, match="--lora-modules"):
            ServerOptions(lora_modules=bad)
