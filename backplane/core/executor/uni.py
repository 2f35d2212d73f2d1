"""In-process execution: one rank, or one rank of an SPMD program (``external_launcher``)."""

from __future__ import annotations

import logging

from backplane.core.distributed.parallel_state import (
    destroy_model_parallel,
    get_parallel_state,
    init_model_parallel,
    single_rank_state,
)
from backplane.core.executor.base import Executor
from backplane.core.model_runner.runner import LaunchedStep, ModelRunner, ModelRunnerOutput
from backplane.core.scheduler.output import SchedulerOutput

logger = logging.getLogger(__name__)


class UniExecutor(Executor):
    """The runner in this process; nothing to send anywhere."""

    def __init__(self, config, platform) -> None:
        with single_rank_state():
            self.runner = ModelRunner(config, platform)

    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        return self.runner.launch(out)

    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        return self.runner.collect(launched)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(out)


class ExternalLauncherExecutor(UniExecutor):
    """One rank of a program every rank runs in full (``torchrun``), as RL trainers do.

    Each process runs the whole engine: its own scheduler sees the same requests
    in the same order and so plans the same steps, and its runner holds this
    rank's slice of the model. Ranks meet in the runners' collectives; rank 0's
    sampled tokens are broadcast, so every rank returns the same outputs. The
    world comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    """

    def __init__(self, config, platform) -> None:
        pc = config.parallel_config
        import os

        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise ValueError(
                f"distributed_executor_backend 'external_launcher' needs every rank started "
                f"by torchrun (or the torch.distributed environment variables); missing: "
                f"{', '.join(missing)}")
        world = pc.tensor_parallel_size * pc.pipeline_parallel_size
        if int(os.environ["WORLD_SIZE"]) != world:
            raise ValueError(
                f"WORLD_SIZE ({os.environ['WORLD_SIZE']}) must equal tensor_parallel_size "
                f"({pc.tensor_parallel_size}) x pipeline_parallel_size "
                f"({pc.pipeline_parallel_size}) = {world} with 'external_launcher'")
        state = get_parallel_state()
        if state.world.size == 1:
            rank = int(os.environ["RANK"])
            platform.init_worker(int(os.environ.get("LOCAL_RANK", rank)),
                                 int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            init_model_parallel(platform, rank=rank,
                                tensor_parallel_size=pc.tensor_parallel_size,
                                pipeline_parallel_size=pc.pipeline_parallel_size)
        self.runner = ModelRunner(config, platform)

    def shutdown(self) -> None:
        destroy_model_parallel()
