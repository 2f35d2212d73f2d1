"""`backplane serve` as a real process (YAML server keys, start-up log, SIGTERM), and
`backplane generate` / `backplane chat` in-process."""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import types

import httpx
import pytest

from backplane import LLM, SamplingParams
from backplane.entrypoints.cli.main import main
from tests.entrypoints.server_utils import wait_healthy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_yaml_api_key_startup_log_and_sigterm(llama_model_dir, tmp_path):
    port = _free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"host: 127.0.0.1\nport: {port}\napi-key: yaml-key\nserved-model-name: demo\n"
        "max-model-len: 64\nnum-kv-blocks: 16\n"
    )
    log = tmp_path / "serve.log"
    env = dict(os.environ, BACKPLANE_LOGGING_LEVEL="INFO")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backplane.entrypoints.cli.main",
                "serve",
                llama_model_dir,
                "--config",
                str(config),
                "--block-size",
                "8",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log.read_text)
        body = {"model": "demo", "prompt": "Hello", "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        ok = httpx.post(
            url + "/v1/completions", json=body, headers={"Authorization": "Bearer yaml-key"}
        )
        assert ok.status_code == 200 and ok.json()["model"] == "demo"
        # SIGTERM while a stream is in flight: uvicorn stops accepting, lets the stream
        # finish (within --graceful-shutdown-timeout), then the engine stops; exit status 0.
        auth = {"Authorization": "Bearer yaml-key"}
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            headers=auth,
            timeout=30,
            json={"prompt": "Hello", "max_tokens": 40, "stream": True, "ignore_eos": True},
        ) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: {")
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "platform cpu chosen" in text
    assert f"model {llama_model_dir} (served as 'demo'), dtype float32, max_model_len 64" in text
    assert "KV cache: 16 blocks of 8 tokens = 128 tokens" in text
    assert f"http://127.0.0.1:{port}/v1" in text and "API key required" in text
    assert "shutting down the engine" in text


def test_serve_rejects_bad_config(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("port: not-a-number\n")
    assert main(["serve", "/nonexistent", "--config", str(config)]) == 2
    assert "port: 'not-a-number' is not a valid int" in capsys.readouterr().err


@pytest.fixture(scope="module")
def greedy_reference(llama_model_dir) -> LLM:
    return LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=16)


def test_generate_prints_the_completion(llama_model_dir, greedy_reference, capsys):
    rc = main(
        [
            "generate",
            "The quick brown fox",
            "--model",
            llama_model_dir,
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--max-model-len",
            "64",
            "--num-kv-blocks",
            "16",
        ]
    )
    assert rc == 0
    expected = (
        greedy_reference.generate(
            "The quick brown fox", SamplingParams(max_tokens=6, temperature=0), use_tqdm=False
        )[0]
        .outputs[0]
        .text
    )
    assert capsys.readouterr().out == expected + "\n"


def test_chat_streams_replies_until_exit(llama_model_dir, greedy_reference, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n\nWhat next?\n/exit\nignored\n"))
    rc = main(
        [
            "chat",
            "--model",
            llama_model_dir,
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--max-model-len",
            "64",
            "--num-kv-blocks",
            "16",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    first = (
        greedy_reference.chat(
            [{"role": "user", "content": "Hello there"}],
            SamplingParams(max_tokens=4, temperature=0),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .text
    )
    assert len(lines) == 2  # one reply per user line; the empty line and /exit get none
    assert lines[0] == first


def test_serve_without_model_uses_the_demo_model(monkeypatch, tmp_path):
    from backplane.entrypoints.cli.main import build_parser
    from backplane.entrypoints.cli.serve import build_engine_args

    importlib.import_module("backplane.demo_model")  # the fake must win even after the real
    demo = types.ModuleType("backplane.demo_model")
    demo.default_model_path = lambda: str(tmp_path / "demo")
    demo.DEMO_MODEL_NAME = "demo-name"
    monkeypatch.setitem(sys.modules, "backplane.demo_model", demo)
    monkeypatch.delenv("BACKPLANE_MODEL", raising=False)
    monkeypatch.delenv("BACKPLANE_CONFIG", raising=False)
    args = build_parser().parse_args(["serve", "--max-model-len", "64", "--port", "9"])
    engine_args = build_engine_args(args)
    assert engine_args.model == str(tmp_path / "demo") and engine_args.max_model_len == 64
    assert engine_args.served_model_name == ["demo-name"]
    named = build_engine_args(build_parser().parse_args(["serve", "/some/model"]))
    assert named.model == "/some/model"
