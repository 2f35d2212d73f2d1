"""`StructuredOutputManager`: validates and compiles constraints (async, cached), and fills
and applies the per-step token bitmasks for a batch."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from backplane.core.structured_outputs.backend import Grammar, GrammarBackend, bitmask_width
from backplane.core.structured_outputs.errors import UnsupportedSpecError
from backplane.core.structured_outputs.params import (
    StructuredOutputsParams,
    canonical_backend_name,
)
from backplane.plugins_sdk.token_bitmask import apply_token_bitmask as apply_bitmask

# Backends tried, in order, by "auto" (vLLM V1: xgrammar, then guidance on unsupported specs).
AUTO_ORDER = ("xgrammar", "guidance")


def _default_factories() -> dict[str, Callable[..., GrammarBackend]]:
    def xgrammar(tokenizer, vocab_size, eos_token_ids):
        from backplane.core.structured_outputs.xgrammar_backend import XgrammarBackend
        return XgrammarBackend(tokenizer, vocab_size, eos_token_ids)

    def guidance(tokenizer, vocab_size, eos_token_ids):
        from backplane.core.structured_outputs.guidance_backend import GuidanceBackend
        return GuidanceBackend(tokenizer, vocab_size, eos_token_ids)

    return {"xgrammar": xgrammar, "guidance": guidance}


class StructuredOutputManager:
    """One per engine (per tokenizer). Thread-safe.

    ``tokenizer`` is a Hugging Face fast tokenizer; ``vocab_size`` the model's (logits')
    vocabulary size, which may exceed the tokenizer's (those ids are always masked).
    ``default_backend`` is "auto", "xgrammar" or "guidance"; a request's ``backend`` overrides
    it. ``backend_factories`` replaces/extends how backends are built (tests, new backends):
    ``name -> factory(tokenizer, vocab_size, eos_token_ids)``; backends are built lazily.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, default_backend: str = "auto", *,
                 eos_token_ids: Sequence[int] | None = None, max_workers: int = 2,
                 cache_size: int = 512,
                 backend_factories: dict[str, Callable[..., GrammarBackend]] | None = None,
                 auto_order: Sequence[str] = AUTO_ORDER) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else None
        self._factories = _default_factories()
        self._factories.update(backend_factories or {})
        self.default_backend = self._canonical(default_backend)
        self.auto_order = tuple(auto_order)
        self._backends: dict[str, GrammarBackend] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="structured-outputs")
        # (backend, key) -> Future[compiled]; in-flight compiles are shared, failures dropped.
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._cache_size = cache_size
        # key -> backend that "auto" resolved to (so a hit skips the refusing backend).
        self._auto_choice: dict[tuple, str] = {}
        self.stats = {"hits": 0, "misses": 0, "compile_s": 0.0}

    def _canonical(self, name: str) -> str:
        if name in self._factories or name == "auto":
            return name
        return canonical_backend_name(name)

    # ------------------------------------------------------------------ backends
    def backend(self, name: str) -> GrammarBackend:
        """The named backend, built on first use (tokenizer tables: tens of ms)."""
        with self._lock:
            be = self._backends.get(name)
            if be is None:
                if name not in self._factories:
                    raise ValueError(f"unknown structured-output backend {name!r}")
                be = self._factories[name](self.tokenizer, self.vocab_size, self.eos_token_ids)
                self._backends[name] = be
            return be

    def _candidates(self, params: StructuredOutputsParams) -> list[str]:
        name = self._canonical(params.backend) if params.backend else self.default_backend
        if name != "auto":
            return [name]
        key = params.key()
        chosen = self._auto_choice.get(key)
        return [chosen] if chosen else list(self.auto_order)

    def _over_candidates(self, params: StructuredOutputsParams,
                         fn: Callable[[GrammarBackend], Any]) -> tuple[str, Any]:
        candidates = self._candidates(params)
        last: UnsupportedSpecError | None = None
        for name in candidates:
            try:
                result = fn(self.backend(name))
            except UnsupportedSpecError as exc:
                last = exc
                continue
            if len(candidates) > 1:
                self._auto_choice[params.key()] = name
            return name, result
        assert last is not None
        if len(candidates) > 1:
            raise UnsupportedSpecError(
                f"no backend can enforce this constraint: {last}", backend=last.backend) from last
        raise last

    # ------------------------------------------------------------------ validate / compile
    def validate(self, params: StructuredOutputsParams) -> str:
        """Cheap synchronous check at request-add time: raises InvalidSpecError (or
        UnsupportedSpecError, when no allowed backend can enforce it), else returns the name
        of the backend that will compile it."""
        name, _ = self._over_candidates(params, lambda be: be.validate(params))
        return name

    def _compiled(self, backend: GrammarBackend, params: StructuredOutputsParams) -> Any:
        """The cached compiled form (compiling here, in this thread, on a miss)."""
        key = (backend.name, params.key())
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                owner = False
            else:
                fut = Future()
                fut.set_running_or_notify_cancel()
                self._cache[key] = fut
                self.stats["misses"] += 1
                owner = True
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if not owner:
            return fut.result()
        start = time.perf_counter()
        try:
            compiled = backend.compile_spec(params)
        except BaseException as exc:
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]
            fut.set_exception(exc)
            raise
        self.stats["compile_s"] += time.perf_counter() - start
        fut.set_result(compiled)
        return compiled

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """Synchronous compile (cached) -> a fresh per-request Grammar."""
        def build(be: GrammarBackend) -> Grammar:
            return be.new_grammar(self._compiled(be, params))
        return self._over_candidates(params, build)[1]

    def submit(self, params: StructuredOutputsParams) -> Future[Grammar]:
        """Compile on the worker pool; the Future yields a fresh Grammar for this request or
        raises InvalidSpecError / UnsupportedSpecError. Poll ``done()`` each step rather than
        blocking, so other requests keep running while this one compiles."""
        return self._executor.submit(self.compile, params)

    def cached(self, params: StructuredOutputsParams, backend: str | None = None) -> bool:
        name = backend or self._candidates(params)[0]
        with self._lock:
            fut = self._cache.get((name, params.key()))
        return fut is not None and fut.done() and fut.exception() is None

    # ------------------------------------------------------------------ bitmasks
    @property
    def bitmask_width(self) -> int:
        return bitmask_width(self.vocab_size)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """A CPU int32 ``(num_rows, ceil(vocab_size / 32))`` bitmask, all allowed (-1)."""
        return torch.full((num_rows, self.bitmask_width), -1, dtype=torch.int32)

    def fill_bitmasks(self, grammars: Sequence[Grammar | None], bitmask: torch.Tensor) -> None:
        """Row i <- grammars[i]'s allowed next tokens; ``None`` (unconstrained) rows and
        rows of terminated grammars are left all-allowed (-1)."""
        if bitmask.shape[0] < len(grammars):
            raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(grammars)} grammars")
        for row, grammar in enumerate(grammars):
            if grammar is None or grammar.is_terminated():
                bitmask[row].fill_(-1)
            else:
                grammar.fill_bitmask(bitmask, row)

    apply_bitmask = staticmethod(apply_bitmask)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
