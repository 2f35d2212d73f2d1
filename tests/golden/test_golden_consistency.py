"""The golden greedy outputs of the tiny Llama fixture must not change silently.

A change to kernels, model code, sampling or the fixture builder that alters
numerics makes `backplane bench consistency --against` fail here. If the change
is intended, re-record the file (see tests/golden/README.md) and say why in the
commit message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from backplane.entrypoints.cli.bench_consistency import (
    compare_records,
    load_record,
    register_consistency,
)

GOLDEN = Path(__file__).parent / "llama_tiny_greedy.json"
# The flags the golden file was recorded with (also in README.md).
ENGINE_FLAGS = ["--model", "llama-tiny", "--dtype", "float32", "--max-model-len", "256",
                "--num-kv-blocks", "64", "--device", "cpu"]


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register_consistency(parser.add_subparsers())
    args = parser.parse_args(["consistency", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def tiny_llama_cwd(tmp_path_factory):
    """A directory holding the seeded tiny Llama as ./llama-tiny (relative, like the golden)."""
    from tests.fixtures.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("golden")
    make_tiny_model(root / "llama-tiny", "llama")
    return root


def test_current_outputs_match_golden_file(tiny_llama_cwd, monkeypatch, capsys):
    monkeypatch.chdir(tiny_llama_cwd)
    rc = _bench([*ENGINE_FLAGS, "--against", str(GOLDEN)])
    out = capsys.readouterr().out
    assert rc == 0, f"greedy outputs changed against {GOLDEN.name}:\n{out}"
    assert "consistent: all 8 prompts" in out


def test_a_changed_output_is_reported_and_fails(tiny_llama_cwd, monkeypatch, capsys):
    record = load_record(str(GOLDEN))
    record["results"][2]["token_ids"][5] += 1
    record["results"][2]["text"] += "?"
    tampered = tiny_llama_cwd / "tampered.json"
    tampered.write_text(json.dumps(record))
    monkeypatch.chdir(tiny_llama_cwd)
    assert _bench([*ENGINE_FLAGS, "--against", str(tampered)]) == 1
    out = capsys.readouterr().out
    assert "INCONSISTENT: 1 of 8 prompts differ" in out
    assert "prompt 2 'Explain how rivers shape valleys': first difference at output token 5" in out


def test_save_round_trip_and_format_check(tiny_llama_cwd, monkeypatch, capsys):
    monkeypatch.chdir(tiny_llama_cwd)
    assert _bench([*ENGINE_FLAGS, "--max-tokens", "4", "--save", "mine.json"]) == 0
    saved = load_record(str(tiny_llama_cwd / "mine.json"))
    golden = load_record(str(GOLDEN))
    assert [r["token_ids"] for r in saved["results"]] == [
        r["token_ids"][:4] for r in golden["results"]
    ]
    assert compare_records(saved, saved) == []
    (tiny_llama_cwd / "other.json").write_text('{"format": "something-else"}')
    assert _bench([*ENGINE_FLAGS, "--against", "other.json"]) == 2
    assert "is not a `backplane bench consistency --save` file" in capsys.readouterr().err
