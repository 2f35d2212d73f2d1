"""The async API for embedding Backplane in an asyncio application (vLLM's `AsyncLLM`).

```python
from backplane import AsyncLLM, SamplingParams

async with AsyncLLM(model="/path/to/model", max_model_len=4096) as llm:
    params = SamplingParams(temperature=0.0, max_tokens=64)
    async for output in llm.generate("Once upon a time", params, request_id="r1"):
        print(output.outputs[0].text)  # cumulative: the whole text so far
```

A thin front of `AsyncEngine`: one background thread owns the LLMEngine and
steps it while any request is unfinished, so concurrent `generate()` calls are
batched together (continuous batching) and the event loop never blocks on a
step. Building the engine (loading weights, sizing the KV cache) blocks: build
it before the event loop starts serving, or in `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from backplane.config import EngineArgs
from backplane.core.engine.async_engine import AsyncEngine, EngineDeadError
from backplane.entrypoints.llm import LLM
from backplane.inputs import PromptType, parse_prompt
from backplane.outputs import RequestOutput
from backplane.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "EngineDeadError"]


class AsyncLLM:
    """An engine for asyncio applications, with vLLM's `AsyncLLM` methods.

    ``AsyncLLM(model=..., **kwargs)`` takes the keyword arguments of `LLM`
    (EngineArgs fields such as dtype, max_model_len, max_num_seqs,
    enable_prefix_caching, seed, device; unknown ones raise ValueError), or
    build one with `AsyncLLM.from_engine_args(EngineArgs(...))`. The engine's
    loop thread starts at once; call `shutdown()` (or use ``with`` /
    ``async with``) to stop it.

    Attributes:
        engine: the `AsyncEngine` this wraps (``engine.engine`` is the LLMEngine,
            owned by the loop thread: read from it, never drive it).
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = AsyncEngine.from_engine_args(LLM._engine_args(model, kwargs))

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncLLM:
        """Build the engine from ``engine_args`` (blocking) and start its loop thread."""
        if not isinstance(engine_args, EngineArgs):
            raise TypeError(f"engine_args must be an EngineArgs, got {type(engine_args).__name__}")
        llm = cls.__new__(cls)
        llm.engine = AsyncEngine.from_engine_args(engine_args)
        return llm

    # ----- requests -----

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield cumulative RequestOutputs for one request until it finishes.

        ``prompt`` is a string, a list of token ids, or a TextPrompt /
        TokensPrompt dict (`backplane.inputs`). Bad arguments raise TypeError or
        ValueError naming the field on the first iteration, before anything
        reaches the engine; a request the engine refuses (too long for
        max_model_len, a request_id in use) raises ValueError there too, and
        EngineDeadError when the engine is not running. A consumer that falls
        behind skips to the newest output. Stopping the iteration early
        (``break``, cancellation, ``aclose()``) aborts the request and frees
        its KV blocks; `abort()` ends it with finish_reason ``"abort"``.
        """
        _check_request(prompt, sampling_params, request_id, priority)
        async with contextlib.aclosing(
            self.engine.generate(request_id, prompt, sampling_params, priority)
        ) as outputs:
            async for output in outputs:
                yield output

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Abort one request or several (unknown or finished ones are ignored).

        Whoever iterates the request's `generate()` then receives a final
        output with finish_reason ``"abort"``, and the iteration ends.
        """
        request_ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in request_ids:
            await self.engine.abort(rid)

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (run by the loop thread between two steps).

        Returns False, changing nothing, while any request holds KV blocks.
        """
        return await self.engine.reset_prefix_cache()

    async def get_tokenizer(self):
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer

    # ----- health and lifecycle -----

    @property
    def is_running(self) -> bool:
        """True while the loop thread runs and accepts requests."""
        return self.engine.is_running

    @property
    def errored(self) -> bool:
        """True when the loop thread died from an exception (not after `shutdown()`)."""
        return self.engine.errored

    @property
    def dead_error(self) -> BaseException | None:
        """The exception that killed the loop thread, if any."""
        return self.engine.dead_error

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine cannot serve requests (died or shut down)."""
        self.engine.check_health()

    def shutdown(self) -> None:
        """Stop the engine: requests in flight end with finish_reason "abort"; joins the thread.

        Blocks until the loop thread has stopped (at most one step); idempotent.
        """
        self.engine.shutdown()

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.shutdown)


def _check_request(prompt: Any, sampling_params: Any, request_id: Any, priority: Any) -> None:
    """TypeError/ValueError naming the first bad argument of `AsyncLLM.generate`."""
    if not isinstance(sampling_params, SamplingParams):
        raise TypeError(
            f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}"
        )
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
    if not request_id:
        raise ValueError("request_id must be a non-empty string")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    parse_prompt(prompt, "prompt")
