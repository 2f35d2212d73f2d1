"""PlatformConfigView and ConfigPolicy.check_and_update: the typed view a policy gets (SDK 1.1)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from backplane.plugins_sdk import ConfigDecision, ConfigPolicy, PlatformConfigView
from backplane.plugins_sdk import deprecation as dep
from backplane.plugins_sdk.platform import LEGACY_CONFIG_HOOK, run_config_policy

WRITABLE = ("dtype", "block_size", "memory_utilization", "kv_cache_memory_bytes",
            "num_kv_blocks", "compile", "use_graphs", "graph_capture_sizes", "attention_backend")


def test_writable_fields_are_exactly_the_documented_ones():
    assert PlatformConfigView.WRITABLE_FIELDS == WRITABLE
    names = {f.name for f in dataclasses.fields(PlatformConfigView)}
    assert set(PlatformConfigView.READ_ONLY_FIELDS) == names - set(WRITABLE)
    assert {"architecture", "num_heads", "num_kv_heads", "head_size", "sliding_window",
            "max_model_len", "vocab_size", "tensor_parallel_size", "max_num_seqs",
            "max_num_batched_tokens", "optimization_level", "compile_backend",
            "kv_cache_dtype"} <= set(PlatformConfigView.READ_ONLY_FIELDS)


def test_docstring_table_lists_every_field_with_its_access():
    rows = dict(re.findall(r"^    (\w+)\s+.+?\s+(read|write)\s+\S", PlatformConfigView.__doc__,
                           re.MULTILINE))
    expected = {f.name: "write" if f.name in WRITABLE else "read"
                for f in dataclasses.fields(PlatformConfigView)}
    assert rows == expected


def test_for_testing_defaults_and_overrides():
    view = PlatformConfigView.for_testing()
    assert (view.num_heads, view.num_kv_heads, view.head_size, view.max_model_len) == (
        4, 2, 32, 256)
    assert (view.dtype, view.block_size, view.kv_cache_dtype, view.use_graphs) == (
        torch.float32, 16, "auto", False)
    assert view.updates() == {}
    view = PlatformConfigView.for_testing(kv_cache_dtype="fp8", graph_capture_sizes=[4, 1])
    assert view.kv_cache_dtype == "fp8" and view.graph_capture_sizes == (4, 1)
    with pytest.raises(TypeError, match=r"no field\(s\) \['no_such'\]"):
        PlatformConfigView.for_testing(no_such=1)


def test_read_only_field_names_itself_and_the_writable_ones():
    view = PlatformConfigView.for_testing()
    with pytest.raises(AttributeError) as info:
        view.max_num_seqs = 4
    assert str(info.value) == (
        "PlatformConfigView.max_num_seqs is read-only; a ConfigPolicy may change only "
        + ", ".join(WRITABLE))
    with pytest.raises(AttributeError, match="PlatformConfigView.cache_config is not a field"):
        view.cache_config = None
    with pytest.raises(AttributeError, match="cannot be deleted"):
        del view.block_size
    assert view.max_num_seqs == 256


@pytest.mark.parametrize(("name", "value", "error"), [
    ("dtype", "float16", TypeError),
    ("block_size", 0, ValueError),
    ("block_size", 16.0, ValueError),
    ("memory_utilization", 1.5, ValueError),
    ("memory_utilization", True, TypeError),
    ("kv_cache_memory_bytes", -1, ValueError),
    ("num_kv_blocks", True, ValueError),
    ("compile", 1, TypeError),
    ("graph_capture_sizes", [0, 8], ValueError),
    ("attention_backend", "", TypeError),
])
def test_writable_fields_check_their_values(name, value, error):
    view = PlatformConfigView.for_testing()
    with pytest.raises(error, match=f"PlatformConfigView.{name}"):
        setattr(view, name, value)
    assert view.updates() == {}


def test_updates_are_the_changed_writable_fields():
    view = PlatformConfigView.for_testing()
    view.block_size = 16  # unchanged value
    view.num_kv_blocks = 12
    view.graph_capture_sizes = [8, 2, 8]
    view.dtype = torch.bfloat16
    assert view.updates() == {"num_kv_blocks": 12, "graph_capture_sizes": (2, 8),
                              "dtype": torch.bfloat16}


class _NewPolicy(ConfigPolicy):
    def check_and_update(self, view):
        view.block_size = 32
        return ConfigDecision(changes=["block_size 32"])


class _OldPolicy(ConfigPolicy):
    def check_and_update_config(self, config):
        config.touched = True
        return ConfigDecision(changes=["old way"])


class _BothPolicy(_OldPolicy, _NewPolicy):
    pass


def test_new_policy_gets_the_view_without_warnings(recwarn):
    view = PlatformConfigView.for_testing()
    assert run_config_policy(_NewPolicy(), view, legacy_config=object()).changes == [
        "block_size 32"]
    assert view.updates() == {"block_size": 32}
    assert run_config_policy(_BothPolicy(), PlatformConfigView.for_testing()).changes == [
        "block_size 32"]
    assert run_config_policy(ConfigPolicy(), view) == ConfigDecision()
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_old_policy_is_called_the_old_way_with_a_warning():
    class Config:
        touched = False

    config = Config()
    with pytest.warns(DeprecationWarning, match=(
            r"test_config_view\._OldPolicy: ConfigPolicy.check_and_update_config is deprecated "
            r"since plugin SDK 1.1 and will be removed in SDK 1.2; use "
            r"ConfigPolicy.check_and_update\(view: PlatformConfigView\) instead")):
        decision = run_config_policy(_OldPolicy(), PlatformConfigView.for_testing(), config)
    assert decision.changes == ["old way"] and config.touched
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="implement "
                                                         r"check_and_update\(view"):
        run_config_policy(_OldPolicy(), PlatformConfigView.for_testing())


def test_old_method_on_a_new_policy_forwards_a_view_and_refuses_a_config():
    view = PlatformConfigView.for_testing()
    with pytest.warns(DeprecationWarning):
        assert _NewPolicy().check_and_update_config(view).changes == ["block_size 32"]
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="PlatformConfigView"):
        _NewPolicy().check_and_update_config(object())
    with pytest.warns(DeprecationWarning):
        assert ConfigPolicy().check_and_update_config(object()) == ConfigDecision()


def test_the_old_hook_is_a_recorded_deprecation():
    assert LEGACY_CONFIG_HOOK.deprecation in dep.DEPRECATIONS
    assert (LEGACY_CONFIG_HOOK.deprecation.since,
            LEGACY_CONFIG_HOOK.deprecation.removed_in) == ("1.1", "1.2")


def test_deprecated_override_helper(monkeypatch):
    monkeypatch.setattr(dep, "DEPRECATIONS", list(dep.DEPRECATIONS))

    class Base:
        def old(self):
            pass

        def new(self):
            pass

    class OnlyOld(Base):
        def old(self):
            pass

    class Both(OnlyOld):
        def new(self):
            pass

    hook = dep.deprecated_override(Base, "old", "new", since="1.1")
    assert hook.deprecation.message() == (
        "test_deprecated_override_helper.<locals>.Base.old is deprecated since plugin SDK 1.1 "
        "and will be removed in SDK 1.2; use test_deprecated_override_helper.<locals>.Base.new "
        "instead")
    assert hook.implements_only_old(OnlyOld())
    assert not hook.implements_only_old(Both()) and hook.implements_new(Both())
    assert not hook.implements_only_old(Base())
    with pytest.warns(DeprecationWarning,
                      match=r"test_config_view\.test_deprecated_override_helper\.<locals>"
                            r"\.OnlyOld: .*Base\.old is deprecated"):
        hook.warn(OnlyOld(), stacklevel=2)
