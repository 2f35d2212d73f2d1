"""Adapters loaded in host memory: read once, off the engine thread, kept in an LRU."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from backplane.core.scheduler.request import lora_key

logger = logging.getLogger(__name__)


class LoRAAdapterCache:
    """``max_cpu_loras`` adapters' weights, mapped onto the model's LoRA layers."""

    def __init__(self, targets: dict, max_rank: int, capacity: int) -> None:
        self.targets = targets
        self.max_rank = max_rank
        self.capacity = capacity
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="backplane-lora-load")

    def get(self, lora_request) -> tuple[object | None, Future | None]:
        """(weights, None) when loaded; else (None, a Future of the weights)."""
        key = lora_key(lora_request)
        with self._lock:
            weights = self._loaded.get(key)
            if weights is not None:
                self._loaded.move_to_end(key)
                return weights, None
            future = self._loading.get(key)
            if future is None:
                future = self._pool.submit(self._load, key, lora_request)
                self._loading[key] = future
            return None, future

    def _load(self, key: str, lora_request):
        from backplane.lora import load_lora_adapter

        try:
            weights = load_lora_adapter(lora_request.lora_path, self.targets,
                                        max_rank=self.max_rank, name=lora_request.lora_name)
        finally:
            with self._lock:
                self._loading.pop(key, None)
        with self._lock:
            self._loaded[key] = weights
            while len(self._loaded) > self.capacity:
                dropped, _ = self._loaded.popitem(last=False)
                logger.info("LoRA: adapter %s left the host cache (max_cpu_loras=%d)", dropped,
                            self.capacity)
        logger.info("LoRA: loaded adapter %r (rank %d) from %s", lora_request.lora_name,
                    weights.rank, lora_request.lora_path)
        return weights

    def forget(self, lora_request) -> None:
        with self._lock:
            self._loaded.pop(lora_key(lora_request), None)
