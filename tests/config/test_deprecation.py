"""Deprecated options: warn once while they work, fail naming the replacement once removed."""

from __future__ import annotations

import argparse
import warnings

import pytest

from backplane import version
from backplane.config.cli_args import add_engine_args, engine_args_from_cli
from backplane.config.deprecation import DEPRECATED_OPTIONS, reset_warnings
from backplane.config.sources import engine_args_from_sources


@pytest.fixture(autouse=True)
def _fresh_warnings():
    reset_warnings()
    yield
    reset_warnings()


def _kwargs(**kw):
    return engine_args_from_sources(kwargs={"model": "m", **kw}, env={})


def test_renamed_option_works_and_warns_once_naming_version_and_replacement():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _kwargs(num_gpu_blocks_override=64)
        second = _kwargs(num_gpu_blocks_override=65)
    assert (first.num_kv_blocks, second.num_kv_blocks) == (64, 65)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1
    text = str(deprecations[0].message)
    assert "'num_gpu_blocks_override'" in text
    assert "will be removed in 0.3.0" in text and "use 'num_kv_blocks' instead" in text


def test_removed_without_replacement_is_dropped_with_warning():
    with pytest.warns(DeprecationWarning, match="swap_space.*no replacement"):
        args = _kwargs(swap_space=4)
    assert not hasattr(args, "swap_space")


def test_deprecated_flag_env_and_yaml_spellings(tmp_path):
    parser = add_engine_args(argparse.ArgumentParser())
    with pytest.warns(DeprecationWarning):
        args = engine_args_from_cli(parser.parse_args(["--model", "m", "--max-seq-len", "300"]))
    assert args.max_model_len == 300
    reset_warnings()
    with pytest.warns(DeprecationWarning):
        args = engine_args_from_sources(kwargs={"model": "m"}, env={"BACKPLANE_MAX_SEQ_LEN": "77"})
    assert args.max_model_len == 77
    reset_warnings()
    path = tmp_path / "old.yaml"
    path.write_text("model: m\nmax-seq-len: 99\nuse-v2-block-manager: true\n")
    with pytest.warns(DeprecationWarning):
        assert engine_args_from_sources(yaml_path=path, env={}).max_model_len == 99


def test_old_and_new_name_together_is_an_error():
    with pytest.raises(ValueError, match="both 'max_seq_len' .* and 'max_model_len'"):
        with pytest.warns(DeprecationWarning):
            _kwargs(max_seq_len=1, max_model_len=2)


def test_version_bump_turns_warning_into_error(monkeypatch):
    with pytest.warns(DeprecationWarning):
        assert _kwargs(max_seq_len=128).max_model_len == 128
    monkeypatch.setattr(version, "__version__", "0.2.5")  # still inside the window
    reset_warnings()
    with pytest.warns(DeprecationWarning):
        assert _kwargs(max_seq_len=128).max_model_len == 128
    monkeypatch.setattr(version, "__version__", "0.3.0")  # removal release
    with pytest.raises(ValueError) as err:
        _kwargs(max_seq_len=128, swap_space=4)
    text = str(err.value)
    assert "'max_seq_len' (in keyword arguments) was removed in Backplane 0.3.0" in text
    assert "use 'max_model_len' instead" in text
    assert "'swap_space'" in text and "no replacement" in text  # both reported at once


def test_every_entry_is_consistent():
    from packaging.version import Version

    from backplane.config.options import OPTIONS_BY_NAME

    for entry in DEPRECATED_OPTIONS.values():
        assert Version(entry.deprecated_in) < Version(entry.removed_in)
        assert entry.old not in OPTIONS_BY_NAME
        assert entry.new is None or entry.new in OPTIONS_BY_NAME
    assert "gpu_memory_utilization" not in DEPRECATED_OPTIONS  # vLLM spelling, kept for good
