"""The public contract between Backplane's core and platform plugins.

Plugins import only from this package. Everything here follows the SDK version
in `backplane.plugins_sdk.version.SDK_VERSION`: within a major version, members
are only added; a member that goes away is deprecated for one minor first.
"""

from backplane.plugins_sdk.attention import (
    AttentionBackend,
    AttentionSpec,
    CommonAttentionMetadata,
)
from backplane.plugins_sdk.communicator import Communicator
from backplane.plugins_sdk.descriptor import PlatformDescriptor, ProbeResult
from backplane.plugins_sdk.graph import GraphRunner
from backplane.plugins_sdk.platform import ConfigDecision, ConfigPolicy, DeviceRuntime, Platform
from backplane.plugins_sdk.version import SDK_VERSION

__all__ = [
    "SDK_VERSION",
    "AttentionBackend",
    "AttentionSpec",
    "CommonAttentionMetadata",
    "Communicator",
    "ConfigDecision",
    "ConfigPolicy",
    "DeviceRuntime",
    "GraphRunner",
    "Platform",
    "PlatformDescriptor",
    "ProbeResult",
]
