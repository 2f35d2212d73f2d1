"""compute_hash: stable across processes, changes with numerics, not with operational settings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.config.helpers import cpu_platform, engine_config, llama_hf_config

_SCRIPT = textwrap.dedent(
    """
    from tests.config.helpers import cpu_platform, engine_config
    cfg = engine_config(max_model_len=256, block_size=16).finalize(cpu_platform())
    print(cfg.compute_hash())
    """
)


def _hash(**args) -> str:
    return engine_config(**args).finalize(cpu_platform()).compute_hash()


def test_same_config_same_hash_across_processes():
    here = _hash(max_model_len=256, block_size=16)
    # One other process, with a fixed str-hash seed (this one's is random): set and
    # dict ordering of strings must not leak into the hash.
    other = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "1", "PATH": "/usr/bin:/bin"},
    ).stdout.strip().splitlines()[-1]
    assert other == here
    assert len(here) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"dtype": "bfloat16"},
        {"block_size": 32},
        {"max_model_len": 128},
        {"optimization_level": 1},
        {"compilation_config": {"backend": "eager", "compile": True}},
        {"model": "/models/other"},
    ],
)
def test_numerics_relevant_change_changes_hash(change):
    base = _hash(max_model_len=256)
    assert _hash(**{"max_model_len": 256, **change}) != base


def test_hf_config_change_changes_hash():
    base = engine_config(max_model_len=256).finalize(cpu_platform()).compute_hash()
    other = engine_config(hf=llama_hf_config(rope_theta=500000.0), max_model_len=256)
    assert other.finalize(cpu_platform()).compute_hash() != base


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 7},
        {"served_model_name": "prod"},
        {"max_num_seqs": 3},
        {"memory_utilization": 0.5},
        {"enable_prefix_caching": False},
        {"num_kv_blocks": 100},
    ],
)
def test_operational_change_keeps_hash(change):
    assert _hash(max_model_len=256, **change) == _hash(max_model_len=256)


def test_port_and_log_level_do_not_reach_the_hash(tmp_path, monkeypatch):
    from backplane.config.sources import engine_args_from_sources

    def from_yaml(text: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        cfg = engine_args_from_sources(yaml_path=path, env={}).create_engine_config()
        cfg.model_config.hf_config = llama_hf_config()
        return cfg.finalize(cpu_platform()).compute_hash()

    base = from_yaml("model: /m\nport: 8000\n")
    assert from_yaml("model: /m\nport: 9001\napi-key: secret\n") == base
    monkeypatch.setenv("BACKPLANE_LOGGING_LEVEL", "DEBUG")
    assert from_yaml("model: /m\nport: 8000\n") == base


def test_major_minor_version_bump_changes_hash_patch_does_not(monkeypatch):
    from backplane import version

    base = _hash()
    monkeypatch.setattr(version, "__version__", "0.1.7")
    assert _hash() == base
    monkeypatch.setattr(version, "__version__", "0.2.0")
    assert _hash() != base
