"""The rocm Platform: the cuda plugin's parts over HIP.

PyTorch's ROCm build exposes HIP through the ``torch.cuda`` API (device type
"cuda", HIP graphs behind ``torch.cuda.CUDAGraph``, RCCL behind the "nccl"
backend name) and Triton compiles for AMD GPUs, so this platform reuses the
cuda plugin's runtime, policy, graph runner and attention backends and only
changes its name (which also names it in the policy's messages).
"""

from __future__ import annotations

from backplane.platforms.cuda.platform import CudaPlatform


class RocmPlatform(CudaPlatform):
    """AMD Instinct / Radeon GPUs through torch.cuda on HIP."""

    name = "rocm"
    device_control_env_var = "HIP_VISIBLE_DEVICES"
    ray_device_resource = "GPU"
    dist_backend = "nccl"  # torch maps it to RCCL on ROCm builds
    compile_backend = "inductor"
    supports_graph_capture = True
