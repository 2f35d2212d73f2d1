"""Deprecated home of the ``torch_sdpa_paged`` backend; it lives in the plugin SDK now.

`TorchSdpaPagedAttentionBackend` (exported from `backplane.plugins_sdk`) and its
metadata class moved to `backplane.plugins_sdk.torch_sdpa`, so that every
platform can offer the backend without importing the cuda plugin. The old
names keep resolving here, with a DeprecationWarning, until the SDK minor
after the one that moved them (see `backplane.plugins_sdk.deprecation`).
"""

from __future__ import annotations

from backplane.plugins_sdk import torch_sdpa
from backplane.plugins_sdk.deprecation import deprecated_alias, module_getattr

_MOVED = {
    "TorchSdpaPagedAttentionBackend": "backplane.plugins_sdk.TorchSdpaPagedAttentionBackend",
    "SdpaPagedMetadata": "backplane.plugins_sdk.torch_sdpa.SdpaPagedMetadata",
}

__getattr__ = module_getattr(__name__, {
    name: deprecated_alias(f"{__name__}.{name}", getattr(torch_sdpa, name), since="1.1",
                           replacement=replacement)
    for name, replacement in _MOVED.items()
})
