"""Precedence of option sources: defaults < YAML < BACKPLANE_* env < CLI flags / kwargs."""

from __future__ import annotations

import argparse
import warnings

import pytest

from backplane.config import EngineArgs
from backplane.config.cli_args import add_engine_args, engine_args_from_cli
from backplane.config.deprecation import reset_warnings
from backplane.config.sources import engine_args_from_sources


def _parser() -> argparse.ArgumentParser:
    return add_engine_args(argparse.ArgumentParser(), positional_model=True)


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_text(
        "model: /models/from-yaml\n"
        "max-model-len: 1024\n"
        "max_num_seqs: 8\n"
        "block-size: 32\n"
        "gpu-memory-utilization: 0.5\n"
        "port: 9000\n"  # a server option: allowed, not an engine field
    )
    return path


def test_defaults_only():
    args = engine_args_from_sources(kwargs={"model": "m"}, env={})
    assert args == EngineArgs(model="m")


def test_yaml_overrides_defaults_and_argparse_defaults_do_not_override_yaml(yaml_file):
    ns = _parser().parse_args(["--config", str(yaml_file)])
    args = engine_args_from_sources(cli=ns, env={})
    assert args.model == "/models/from-yaml"
    assert args.max_model_len == 1024
    assert args.max_num_seqs == 8
    assert args.block_size == 32
    assert args.memory_utilization == 0.5  # vLLM alias spelling
    assert args.seed == 0  # untouched default


def test_env_overrides_yaml_and_cli_overrides_env(yaml_file):
    env = {"BACKPLANE_MAX_MODEL_LEN": "2048", "BACKPLANE_MAX_NUM_SEQS": "4",
           "BACKPLANE_ENABLE_PREFIX_CACHING": "false", "BACKPLANE_LOGGING_LEVEL": "DEBUG"}
    ns = _parser().parse_args(["--config", str(yaml_file), "--max-num-seqs", "2"])
    args = engine_args_from_sources(cli=ns, env=env)
    assert args.max_model_len == 2048  # env beats yaml
    assert args.max_num_seqs == 2  # cli beats env
    assert args.enable_prefix_caching is False
    assert args.block_size == 32  # yaml kept where nothing overrides it


def test_kwargs_rank_with_cli_and_config_kwarg(yaml_file):
    args = engine_args_from_sources(
        kwargs={"config": str(yaml_file), "max_model_len": 64}, env={"BACKPLANE_MAX_MODEL_LEN": "9"}
    )
    assert args.max_model_len == 64
    assert args.model == "/models/from-yaml"


def test_positional_model_and_flags():
    ns = _parser().parse_args(["/m", "-O1", "-tp", "2", "--no-enable-chunked-prefill"])
    args = engine_args_from_cli(ns)
    assert (args.model, args.optimization_level, args.tensor_parallel_size) == ("/m", 1, 2)
    assert args.enable_chunked_prefill is False
    with pytest.raises(ValueError, match="model given twice"):
        engine_args_from_cli(_parser().parse_args(["/a", "--model", "/b"]))


def test_optimization_level_spellings():
    for argv in (["-O3"], ["-O", "3"], ["--optimization-level", "3"]):
        assert engine_args_from_cli(_parser().parse_args(["m", *argv])).optimization_level == 3
    env_args = engine_args_from_sources(kwargs={"model": "m"},
                                        env={"BACKPLANE_OPTIMIZATION_LEVEL": "O2"})
    assert env_args.optimization_level == 2
    with pytest.raises(SystemExit):
        _parser().parse_args(["m", "-O7"])


def test_unknown_yaml_key_names_close_match(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nmax-modle-len: 10\nmax_num_seq: 3\n")
    with pytest.raises(ValueError) as err:
        engine_args_from_sources(yaml_path=path, env={})
    text = str(err.value)
    assert "'max-modle-len'" in text and "did you mean: max_model_len" in text
    assert "'max_num_seq'" in text and "max_num_seqs" in text  # both reported at once


def test_bad_values_name_option_and_value():
    with pytest.raises(ValueError, match=r"max_model_len: 'lots' is not a valid int"):
        engine_args_from_sources(kwargs={"model": "m", "max_model_len": "lots"}, env={})
    with pytest.raises(ValueError, match=r"scheduling_policy: 'lifo' is not one of"):
        engine_args_from_sources(kwargs={"model": "m"},
                                 env={"BACKPLANE_SCHEDULING_POLICY": "lifo"})


def test_missing_model_is_reported():
    with pytest.raises(ValueError, match="model is required"):
        engine_args_from_sources(env={})


def test_from_sources_accepts_alias_and_deprecated_name():
    reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = EngineArgs.from_sources(model="m", gpu_memory_utilization=0.3, max_seq_len=99)
    assert args.memory_utilization == 0.3 and args.max_model_len == 99
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


def test_compilation_config_json_flag():
    ns = _parser().parse_args(["m", "--compilation-config", '{"use_graphs": false}'])
    args = engine_args_from_cli(ns)
    assert args.compilation_config == {"use_graphs": False}
    assert args.create_engine_config().compilation_config.use_graphs is False


def test_server_options_allowed_in_yaml_but_not_as_kwargs(yaml_file):
    assert engine_args_from_sources(yaml_path=yaml_file, env={}).model == "/models/from-yaml"
    with pytest.raises(ValueError, match="unknown option 'port' in keyword arguments"):
        engine_args_from_sources(kwargs={"model": "m", "port": 8000}, env={})


def test_unknown_env_var_only_warns(caplog, monkeypatch):
    import logging

    # configure_logging() (run by any in-process CLI test) stops propagation to root.
    monkeypatch.setattr(logging.getLogger("backplane"), "propagate", True)
    args = engine_args_from_sources(kwargs={"model": "m"},
                                    env={"BACKPLANE_MAX_MODEL_LENGTH": "5",
                                         "BACKPLANE_API_KEY": "k"})
    assert args.max_model_len is None
    assert "BACKPLANE_MAX_MODEL_LENGTH is not a Backplane option" in caplog.text
    assert "BACKPLANE_MAX_MODEL_LEN?" in caplog.text
    assert "BACKPLANE_API_KEY" not in caplog.text
