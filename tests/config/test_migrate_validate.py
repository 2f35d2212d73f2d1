"""`backplane config migrate` on old-schema and vLLM files; `config validate` reporting."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from backplane.config.deprecation import reset_warnings
from backplane.config.migrate import migrate_options
from backplane.config.sources import engine_args_from_sources, read_yaml_file
from backplane.entrypoints.cli.main import main

DATA = Path(__file__).parent / "data" / "migrate"
CASES = sorted(p.stem for p in DATA.glob("*.yaml") if not p.stem.endswith(".expected"))


@pytest.fixture(autouse=True)
def _no_log_handler(monkeypatch):
    # main() attaches a stderr handler once per process; under capsys that stream is
    # closed after the test, so keep main() from attaching one here.
    from backplane import logging_utils

    monkeypatch.setattr(logging_utils, "_configured", True)
    monkeypatch.setenv("BACKPLANE_PLATFORM", "cpu")  # same answers on a GPU machine


@pytest.mark.parametrize("case", CASES)
def test_migrate_matches_expected(case):
    result = migrate_options(read_yaml_file(DATA / f"{case}.yaml"))
    expected = yaml.safe_load((DATA / f"{case}.expected.yaml").read_text())
    assert result.options == expected["options"]
    assert list(result.options) == list(expected["options"])  # input order kept
    assert [u.split(":")[0] for u in result.unmapped] == expected["unmapped"]
    assert result.changed == (case != "current")


@pytest.mark.parametrize("case", CASES)
def test_migrated_file_loads_without_warnings_and_validates(case, tmp_path, capsys):
    out = tmp_path / "migrated.yaml"
    assert main(["config", "migrate", str(DATA / f"{case}.yaml"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    if case != "current":
        assert "changed:" in err or "not mapped:" in err
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated name survives migration
        engine_args_from_sources(yaml_path=out, env={})
    if case == "vllm_levels":  # asks for CUDA graphs explicitly: the cpu cannot
        assert main(["config", "validate", str(out)]) == 1
        assert "graph capture (compilation_config.use_graphs=True) is not available" in \
            capsys.readouterr().out
    elif case == "vllm_serve":  # tensor-parallel-size 2 runs on the mp executor
        assert main(["config", "validate", str(out)]) == 0
        output = capsys.readouterr().out
        assert ": OK on platform cpu" in output
        assert "distributed_executor_backend defaults to 'mp' (world size 2)" in output
    else:
        assert main(["config", "validate", str(out)]) == 0
        assert ": OK on platform cpu" in capsys.readouterr().out


def test_migrate_prints_changes_and_unmapped_to_stderr(capsys):
    assert main(["config", "migrate", str(DATA / "vllm_levels.yaml")]) == 0
    captured = capsys.readouterr()
    assert "changed: O: 3 -> optimization-level: 3" in captured.err
    assert "not mapped: compilation-config.pass_config" in captured.err
    assert captured.out.startswith("# Migrated by `backplane config migrate`")
    assert yaml.safe_load(captured.out)["optimization-level"] == 3


def test_validate_reports_several_errors_at_once(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: /no/such/model\n"
        "max-modle-len: 10\n"
        "max-num-seqs: 0\n"
        "block-size: abc\n"
        "enable-chunked-prefill: false\n"
        "max-model-len: 4096\n"
        "max-num-batched-tokens: 100\n"
        "kv-cache-dtype: float16\n"
        "num-gpu-blocks-override: 10\n"
        "port: 8000\n"
    )
    assert main(["config", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: 5 problem(s)" in out
    for needle in (
        "unknown option 'max-modle-len'", "did you mean: max_model_len",
        "max_num_seqs (0) must be >= 1", "block_size: 'abc' is not a valid int",
        "max_num_batched_tokens (100) is smaller than max_model_len (4096)",
        "kv_cache_dtype 'float16' is not supported on the cpu platform",
        "warning: option 'num_gpu_blocks_override'", "model-dependent checks",
    ):
        assert needle in out


def test_validate_runs_model_checks_when_the_model_exists(tmp_path, capsys):
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    LlamaConfig(num_attention_heads=4, num_key_value_heads=4, hidden_size=64,
                max_position_embeddings=256).save_pretrained(model_dir)
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {model_dir}\ntensor-parallel-size: 3\nmax-model-len: 1000\n")
    assert main(["config", "validate", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["model_checked"] is True
    joined = "\n".join(report["errors"])
    assert "tensor_parallel_size (3) must divide num_attention_heads (4)" in joined
    assert "max_model_len (1000) exceeds the model's max_position_embeddings (256)" in joined

    path.write_text(f"model: {model_dir}\nmax-model-len: 128\n")
    assert main(["config", "validate", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["config_hash"]) == 64


def test_validate_unreadable_file(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n")
    assert main(["config", "validate", str(path)]) == 1
    assert "must be a mapping" in capsys.readouterr().out
    assert main(["config", "validate", str(tmp_path / "nope.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_validate_file_without_model_only_warns(tmp_path, capsys):
    path = tmp_path / "serve.yaml"
    path.write_text("port: 8000\nmax-num-seqs: 4\n")
    assert main(["config", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "'model' is not set" in out
