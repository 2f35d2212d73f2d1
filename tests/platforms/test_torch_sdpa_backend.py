"""``torch_sdpa_paged`` is an SDK backend; the cuda plugin's old module is a deprecated alias."""

from __future__ import annotations

import re
import warnings

import pytest

from backplane.plugins_sdk import (
    SDK_VERSION,
    SdkVersion,
    TorchSdpaPagedAttentionBackend,
    torch_sdpa,
)

OLD = "backplane.platforms.cuda.sdpa_attention"


def test_sdk_exports_the_backend():
    assert TorchSdpaPagedAttentionBackend is torch_sdpa.TorchSdpaPagedAttentionBackend
    assert TorchSdpaPagedAttentionBackend.__module__ == "backplane.plugins_sdk.torch_sdpa"
    assert TorchSdpaPagedAttentionBackend.name == "torch_sdpa_paged"
    assert TorchSdpaPagedAttentionBackend.supports_sliding_window


def test_cuda_and_rocm_fall_back_to_the_sdk_backend():
    from backplane.platforms.cuda import descriptor as cuda
    from backplane.platforms.rocm import descriptor as rocm

    for descriptor in (cuda, rocm):  # loading touches no device
        assert descriptor.load().attention_backends()[1:] == [TorchSdpaPagedAttentionBackend]


@pytest.mark.parametrize(("name", "replacement"), [
    ("TorchSdpaPagedAttentionBackend", "backplane.plugins_sdk.TorchSdpaPagedAttentionBackend"),
    ("SdpaPagedMetadata", "backplane.plugins_sdk.torch_sdpa.SdpaPagedMetadata"),
])
def test_old_cuda_module_names_are_deprecated_aliases(name, replacement):
    import backplane.platforms.cuda.sdpa_attention as old

    with pytest.warns(DeprecationWarning) as record:
        value = getattr(old, name)
    assert value is getattr(torch_sdpa, name)
    message = str(record[0].message)
    assert message == (f"{OLD}.{name} is deprecated since plugin SDK 1.1 and will be removed in "
                       f"SDK 1.2; use {replacement} instead")
    removed_in = re.search(r"removed in SDK (\S+);", message).group(1)
    assert SdkVersion.parse(SDK_VERSION) < SdkVersion.parse(removed_in), (
        f"SDK {SDK_VERSION} reached {removed_in}: delete backplane/platforms/cuda/sdpa_attention.py")


def test_from_import_of_the_old_name_warns_and_works():
    with pytest.warns(DeprecationWarning, match="use backplane.plugins_sdk.TorchSdpa"):
        from backplane.platforms.cuda.sdpa_attention import TorchSdpaPagedAttentionBackend as old
    assert old is TorchSdpaPagedAttentionBackend


def test_old_module_has_nothing_else():
    import backplane.platforms.cuda.sdpa_attention as old

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match=f"module '{OLD}' has no attribute 'Other'"):
            old.Other  # noqa: B018
