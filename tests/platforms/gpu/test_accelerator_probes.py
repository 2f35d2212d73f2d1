"""Descriptors of the cuda, rocm and tpu plugins: fields, and probes that report, never raise."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from backplane.platforms import cuda, rocm, tpu
from backplane.plugins_sdk import SDK_VERSION, ProbeResult

DESCRIPTORS = {"cuda": cuda.descriptor, "rocm": rocm.descriptor, "tpu": tpu.descriptor}


@pytest.mark.parametrize("name", sorted(DESCRIPTORS))
def test_descriptor_fields(name):
    desc = DESCRIPTORS[name]
    assert desc.name == name
    assert desc.sdk_version == SDK_VERSION
    assert desc.priority > 0, "accelerators must outrank the cpu platform (priority 0)"
    assert desc.device_type == {"cuda": "cuda", "rocm": "cuda", "tpu": "xla"}[name]


@pytest.mark.parametrize("name", sorted(DESCRIPTORS))
def test_probe_returns_a_result_with_reason(name):
    result = DESCRIPTORS[name].probe()
    assert isinstance(result, ProbeResult)
    assert result.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_probe_explains_cpu_only_torch():
    result = cuda.descriptor.probe()
    assert not result.available
    if torch.version.cuda is None:
        assert f"torch {torch.__version__} has no CUDA support" in result.reason
    else:
        assert "no NVIDIA device visible" in result.reason


@pytest.mark.skipif(torch.version.hip is not None, reason="this torch is a ROCm build")
def test_rocm_probe_explains_missing_hip():
    result = rocm.descriptor.probe()
    assert not result.available
    assert "has no ROCm (HIP) support" in result.reason


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla present")
def test_tpu_probe_and_load_explain_missing_torch_xla():
    result = tpu.descriptor.probe()
    assert result == ProbeResult(False, f"torch_xla is not installed ({tpu.INSTALL_HINT})")
    with pytest.raises(RuntimeError, match="the tpu platform needs torch_xla"):
        tpu.descriptor.load()


def test_cuda_probe_reports_failures_instead_of_raising(monkeypatch):
    def broken_available():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", broken_available)
    result = cuda.descriptor.probe()
    assert result == ProbeResult(False, "cuda probe failed: RuntimeError: driver exploded")


def test_cuda_probe_without_devices(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cuda.descriptor.probe()
    assert not result.available
    assert "no NVIDIA device visible" in result.reason and "CUDA 12.8" in result.reason


def test_cuda_probe_points_rocm_builds_to_rocm(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.3")
    assert "use the rocm platform" in cuda.descriptor.probe().reason


def test_tpu_probe_survives_a_broken_torch_xla(monkeypatch):
    # find_spec says torch_xla exists but importing it fails (a broken install).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: object() if name == "torch_xla" else real_find_spec(name, *a),
    )
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # makes `import torch_xla` raise
    result = tpu.descriptor.probe()
    assert not result.available
    assert result.reason.startswith("tpu probe failed: ModuleNotFoundError")
