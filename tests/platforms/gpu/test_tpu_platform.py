"""The tpu plugin against a stand-in torch_xla exposing the APIs it calls.

TPUs are not reachable from CI; these tests pin down how the plugin uses
torch_xla (probe without starting the runtime, both memory-info formats,
refusals) so that a rename on our side cannot go unnoticed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from backplane.platforms import tpu
from backplane.plugins_sdk import (
    PlatformConfigView,
    ProbeResult,
    TorchSdpaPagedAttentionBackend,
)


@pytest.fixture
def fake_xla(monkeypatch):
    """Install a fake torch_xla package; returns its state to tweak per test."""
    state = SimpleNamespace(device_type="TPU", chips=4, memory={"bytes_limit": 16 << 30,
                                                                "bytes_used": 1 << 30},
                            calls=[])
    root = types.ModuleType("torch_xla")
    root.__version__ = "2.9.0"
    root.device = lambda index=None: torch.device("xla", index or 0)
    root.sync = lambda: state.calls.append("sync")
    runtime = types.ModuleType("torch_xla.runtime")
    runtime.device_type = lambda: state.device_type
    runtime.addressable_runtime_device_count = lambda: state.chips
    xla_model = types.ModuleType("torch_xla.core.xla_model")
    xla_model.get_memory_info = lambda device: dict(state.memory)
    xla_model.wait_device_ops = lambda: state.calls.append("wait")
    xla_model.set_rng_state = lambda seed: state.calls.append(("seed", seed))
    core = types.ModuleType("torch_xla.core")
    core.xla_model = xla_model
    internal = types.ModuleType("torch_xla._internal")
    tpu_info = types.ModuleType("torch_xla._internal.tpu")
    tpu_info.num_available_chips = lambda: state.chips
    internal.tpu = tpu_info
    root.runtime, root.core, root._internal = runtime, core, internal
    for name, module in {
        "torch_xla": root, "torch_xla.runtime": runtime, "torch_xla.core": core,
        "torch_xla.core.xla_model": xla_model, "torch_xla._internal": internal,
        "torch_xla._internal.tpu": tpu_info,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: object() if name == "torch_xla" else real_find_spec(name, *a),
    )
    # The platform modules must bind to the fake, and not stay bound to it afterwards.
    for name in ("backplane.platforms.tpu.platform", "backplane.platforms.tpu.runtime"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield state
    for name in ("backplane.platforms.tpu.platform", "backplane.platforms.tpu.runtime"):
        sys.modules.pop(name, None)


def test_probe_finds_chips(fake_xla):
    assert tpu.descriptor.probe() == ProbeResult(True, "4 TPU chip(s) via torch_xla 2.9.0")


def test_probe_explains_non_tpu_pjrt_device(fake_xla):
    fake_xla.device_type = "CPU"
    result = tpu.descriptor.probe()
    assert not result.available
    assert "PJRT device is 'CPU', not 'TPU'" in result.reason


def test_probe_explains_missing_chips(fake_xla):
    fake_xla.chips = 0
    assert tpu.descriptor.probe() == ProbeResult(
        False, "PJRT_DEVICE is TPU but no TPU chips are visible")


def test_loaded_platform_parts(fake_xla):
    platform = tpu.descriptor.load()
    assert (platform.name, platform.dist_backend, platform.compile_backend) == (
        "tpu", "xla", "openxla")
    assert platform.make_graph_runner() is None and not platform.supports_graph_capture
    assert platform.attention_backends() == [TorchSdpaPagedAttentionBackend]  # the SDK's
    rt = platform.runtime
    assert rt.device_type == "xla" and rt.device_count() == 4
    assert rt.default_dtype() == torch.bfloat16 and torch.float16 not in rt.supported_dtypes
    assert (rt.total_memory(), rt.available_memory()) == (16 << 30, 15 << 30)
    fake_xla.memory = {"kb_total": 1024, "kb_free": 256}  # older torch_xla releases
    assert (rt.total_memory(), rt.available_memory()) == (1 << 20, 256 << 10)
    rt.synchronize()
    rt.seed_everything(7)
    assert fake_xla.calls == ["sync", "wait", ("seed", 7)]


def test_policy_refusals(fake_xla):
    platform = tpu.descriptor.load()
    view = PlatformConfigView.for_testing(kv_cache_dtype="fp8", use_graphs=True)
    refusals = platform.config_policy.check_and_update(view).refusals
    assert len(refusals) == 2
    assert "kv_cache_dtype 'fp8' is not supported on the tpu platform" in refusals[0]
    assert "graph capture (use_graphs=True) does not apply on the tpu platform" in refusals[1]
    ok = PlatformConfigView.for_testing(dtype=torch.bfloat16)
    assert not platform.config_policy.check_and_update(ok).refusals
