"""Executors: how the ranks of a (possibly split) model are run; see base.py."""

from __future__ import annotations

from backplane.core.executor.base import Executor, WorkerDiedError

__all__ = ["Executor", "WorkerDiedError", "make_executor"]


def make_executor(config, platform) -> Executor:
    """The executor ``parallel_config.distributed_executor_backend`` names."""
    backend = config.parallel_config.distributed_executor_backend
    if backend == "uni":
        from backplane.core.executor.uni import UniExecutor

        return UniExecutor(config, platform)
    if backend == "external_launcher":
        from backplane.core.executor.uni import ExternalLauncherExecutor

        return ExternalLauncherExecutor(config, platform)
    if backend == "mp":
        from backplane.core.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config, platform)
    if backend == "ray":
        from backplane.core.executor.ray_executor import RayExecutor

        return RayExecutor(config, platform)
    raise ValueError(f"distributed_executor_backend ({backend!r}) must be one of "
                     "'uni', 'mp', 'ray', 'external_launcher'")
