"""The CPU Platform: torch SDPA paged attention, gloo collectives, no graphs."""

from __future__ import annotations

import logging
import os

import torch

from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from backplane.platforms.cpu.policy import CpuConfigPolicy
from backplane.platforms.cpu.runtime import CpuRuntime, usable_cores
from backplane.plugins_sdk import Platform

logger = logging.getLogger(__name__)


class CpuPlatform(Platform):
    """Runs everything on the host CPU with PyTorch kernels."""

    name = "cpu"
    dist_backend = "gloo"
    compile_backend = "inductor"
    supports_graph_capture = False

    def __init__(self) -> None:
        super().__init__(CpuRuntime(), CpuConfigPolicy())
        # torch picks physical cores by default; respect an explicit OMP setting,
        # otherwise use every core the affinity mask grants this process.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(usable_cores())
        logger.debug("cpu platform: %d torch threads", torch.get_num_threads())

    def attention_backends(self):
        return [CpuSdpaAttentionBackend]
