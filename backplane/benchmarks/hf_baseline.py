"""The transformers baseline: the same requests through `model.generate`.

This is what a CPU user runs without a serving engine: static batches in
arrival order, left padding, greedy decoding, exactly ``output_len`` new
tokens per request (min_new_tokens = max_new_tokens, the equivalent of
ignore_eos). A small sweep of batch sizes is run and the best one is the
baseline, so the comparison is against a tuned `generate`, not a naive one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from backplane.benchmarks.workload import BenchRequest

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (8, 16, 32, 64)


@dataclass
class BaselineRun:
    """One pass of all requests through `generate` at one batch size."""

    batch_size: int
    seconds: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


class TransformersBaseline:
    """A transformers causal LM loaded once, run over request sets at given batch sizes."""

    def __init__(self, model_path: str, dtype: str, num_threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from backplane.config.configs import parse_dtype

        if num_threads:
            torch.set_num_threads(num_threads)
        self.torch_dtype = parse_dtype(dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.torch_dtype)
        self.model.eval()
        gen = self.model.generation_config
        pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        self.pad_token_id = int(pad if pad is not None else 0)

    def _batch_inputs(self, batch: list[BenchRequest]):
        import torch

        width = max(r.prompt_len for r in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, req in enumerate(batch):
            # Left padding: every row's last prompt token sits in the last column.
            ids[row, width - req.prompt_len :] = torch.tensor(req.prompt_token_ids)
            mask[row, width - req.prompt_len :] = 1
        return ids, mask

    def run(self, requests: list[BenchRequest], batch_size: int, progress: bool = False
            ) -> BaselineRun:
        """Generate for every request in static batches of ``batch_size``; time the whole pass."""
        import torch
        from tqdm import tqdm

        if batch_size < 1:
            raise ValueError(f"baseline batch size ({batch_size}) must be at least 1")
        output_len = requests[0].output_len
        if any(r.output_len != output_len for r in requests):
            raise ValueError("the transformers baseline needs one output_len for all requests")
        produced = 0
        start = time.perf_counter()
        bar = tqdm(total=len(requests), desc=f"transformers bs={batch_size}", disable=not progress,
                   leave=False)
        with torch.inference_mode():
            for first in range(0, len(requests), batch_size):
                batch = requests[first : first + batch_size]
                ids, mask = self._batch_inputs(batch)
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=output_len,
                    min_new_tokens=output_len,
                    pad_token_id=self.pad_token_id,
                )
                produced += (out.shape[1] - ids.shape[1]) * len(batch)
                bar.update(len(batch))
        bar.close()
        seconds = time.perf_counter() - start
        return BaselineRun(
            batch_size=batch_size,
            seconds=seconds,
            num_requests=len(requests),
            prompt_tokens=sum(r.prompt_len for r in requests),
            output_tokens=produced,
        )

    def sweep(self, requests: list[BenchRequest], batch_sizes: tuple[int, ...] | list[int],
              progress: bool = False) -> list[BaselineRun]:
        """Run every batch size (capped at the request count, duplicates dropped)."""
        sizes = sorted({min(b, len(requests)) for b in batch_sizes})
        runs = []
        for size in sizes:
            run = self.run(requests, size, progress=progress)
            logger.info("transformers generate bs=%d: %.1f output tok/s", size,
                        run.output_tokens_per_s)
            runs.append(run)
        return runs
