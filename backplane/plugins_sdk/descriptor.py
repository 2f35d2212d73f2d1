"""The light object a platform plugin exposes through its entry point.

Discovery imports only this object, never torch extensions or device runtimes, so
that listing plugins is cheap and a broken plugin cannot take the others down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backplane.plugins_sdk.platform import Platform


# Feature names a descriptor may declare (SDK 1.1).
GRAPH_CAPTURE = "graph_capture"  # make_graph_runner returns a GraphRunner
TORCH_COMPILE = "torch_compile"  # compile_backend names a torch.compile backend
FEATURES = frozenset({GRAPH_CAPTURE, TORCH_COMPILE})


@dataclass(frozen=True)
class ProbeResult:
    """Whether a platform can run in this process, and why (or why not)."""

    available: bool
    reason: str


@dataclass(frozen=True)
class PlatformDescriptor:
    """What a `backplane.platforms` entry point names.

    Attributes:
        name: short platform name used by ``--device`` (``"cpu"``, ``"cuda"``).
        device_type: the torch device string the platform runs on.
        priority: higher wins when several platforms are available; cpu is 0.
        sdk_version: the plugins_sdk version the plugin was written against.
        probe: cheap check, must not raise (discovery guards it anyway).
        load: imports the heavy parts and returns the Platform instance.
        features: what the platform can run, by the names in `FEATURES` (SDK 1.1).
            Read without loading the plugin, so that a configuration another
            platform could run is refused with the platforms that have the feature.
    """

    name: str
    device_type: str
    priority: int
    sdk_version: str
    probe: Callable[[], ProbeResult]
    load: Callable[[], Platform]
    features: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.features) - FEATURES
        if unknown:
            raise ValueError(
                f"platform {self.name!r}: unknown feature(s) {sorted(unknown)}; "
                f"known: {sorted(FEATURES)}"
            )
        object.__setattr__(self, "features", frozenset(self.features))
