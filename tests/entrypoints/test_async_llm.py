"""AsyncLLM: the async Python API (vLLM's) over AsyncEngine."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

import backplane
from backplane import LLM, SamplingParams
from backplane.core.engine.async_engine import (
    MAX_CONSECUTIVE_STEP_FAILURES,
    EngineDeadError,
    EngineStepError,
)
from backplane.entrypoints.async_llm import AsyncLLM
from tests.entrypoints.server_utils import tiny_engine_args

ENGINE_KWARGS = dict(max_model_len=128, num_kv_blocks=32, block_size=16, seed=0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
# long enough that an abort always lands mid-generation (with slowed steps)
LONG = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_model_dir):
    with AsyncLLM.from_engine_args(tiny_engine_args(llama_model_dir, **ENGINE_KWARGS)) as llm:
        yield llm


@pytest.fixture
def slow_steps(llm, monkeypatch):
    """Make each engine step take at least 10 ms, so that requests overlap."""
    real_step = llm.engine.engine.step

    def slow_step():
        time.sleep(0.01)
        return real_step()

    monkeypatch.setattr(llm.engine.engine, "step", slow_step)


def _assert_idle(llm: AsyncLLM) -> None:
    stats = llm.engine.engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks
    assert llm.engine.num_unfinished_requests == 0


async def _collect(llm: AsyncLLM, prompt, params, request_id, **kwargs):
    return [out async for out in llm.generate(prompt, params, request_id, **kwargs)]


def test_exported_from_the_package():
    assert backplane.AsyncLLM is AsyncLLM
    assert "AsyncLLM" in backplane.__all__


def test_greedy_output_equals_llm_generate(llm, llama_model_dir):
    expected = LLM(model=llama_model_dir, **ENGINE_KWARGS).generate(
        "Once upon a time", GREEDY, use_tqdm=False
    )[0]

    async def main():
        tokenizer = await llm.get_tokenizer()
        ids = tokenizer.encode("Once upon a time")
        return (
            await _collect(llm, "Once upon a time", GREEDY, "text"),
            await _collect(llm, ids, GREEDY, "ids"),
            await _collect(llm, {"prompt_token_ids": ids}, GREEDY, "tokens-dict"),
            await _collect(llm, {"prompt": "Once upon a time"}, GREEDY, "text-dict"),
        )

    for outputs in asyncio.run(main()):
        final = outputs[-1]
        assert final.finished and all(not out.finished for out in outputs[:-1])
        assert final.outputs[0].token_ids == expected.outputs[0].token_ids
        assert final.outputs[0].text == expected.outputs[0].text
        # cumulative: each output extends the one before
        lengths = [len(out.outputs[0].token_ids) for out in outputs]
        assert lengths == sorted(lengths) and lengths[-1] == 8
    assert final.prompt_token_ids == expected.prompt_token_ids
    _assert_idle(llm)


def test_concurrent_generate_calls_interleave(llm, slow_steps):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    events: list[tuple[str, bool]] = []
    running: list[int] = []

    async def consume(prompt: str, request_id: str):
        async for out in llm.generate(prompt, params, request_id):
            events.append((request_id, out.finished))
            running.append(llm.engine.get_stats().num_running)
        return out

    async def main():
        return await asyncio.gather(consume("In the beginning", "a"), consume("Hello", "b"))

    a, b = asyncio.run(main())
    assert len(a.outputs[0].token_ids) == len(b.outputs[0].token_ids) == 12
    first_finish = next(i for i, (_, finished) in enumerate(events) if finished)
    assert {rid for rid, _ in events[:first_finish]} == {"a", "b"}, events
    assert max(running) == 2  # one batch, not one request after the other
    _assert_idle(llm)


def test_abort_ends_the_iteration_promptly_and_frees_the_blocks(llm, slow_steps):
    async def main():
        outputs = []

        async def consume():
            async for out in llm.generate("Once upon a time", LONG, "to-abort"):
                outputs.append(out)

        task = asyncio.ensure_future(consume())
        while not outputs:
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        await llm.abort("to-abort")
        await asyncio.wait_for(task, 1.0)
        return outputs, time.monotonic() - t0

    outputs, elapsed = asyncio.run(main())
    final = outputs[-1]
    assert elapsed < 1.0
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert len(final.outputs[0].token_ids) < 100
    _assert_idle(llm)
    # aborting an unknown or finished request, or several at once, is a no-op
    asyncio.run(llm.abort(["to-abort", "never-submitted"]))


def test_closing_the_iterator_aborts_the_request(llm, slow_steps):
    async def main():
        async with contextlib.aclosing(llm.generate("Hello", LONG, "closed")) as gen:
            first = await gen.__anext__()
        assert not first.finished
        for _ in range(100):
            if llm.engine.num_unfinished_requests == 0:
                break
            await asyncio.sleep(0.01)
        # the id is free again
        return await _collect(llm, "Hi", SamplingParams(max_tokens=2), "closed")

    assert asyncio.run(main())[-1].finished
    _assert_idle(llm)


@pytest.mark.parametrize(
    "prompt, params, request_id, kwargs, error, match",
    [
        ("hi", None, "r", {}, TypeError, "sampling_params must be a SamplingParams"),
        ("hi", {"max_tokens": 2}, "r", {}, TypeError, "sampling_params"),
        ("hi", GREEDY, 7, {}, TypeError, "request_id must be a str"),
        ("hi", GREEDY, "", {}, ValueError, "request_id must be a non-empty"),
        ("hi", GREEDY, "r", {"priority": "high"}, TypeError, "priority"),
        (3.5, GREEDY, "r", {}, TypeError, "prompt must be a string"),
        ([1, "x"], GREEDY, "r", {}, TypeError, "prompt must be a list of integer"),
        ({"prompt_token_ids": [-1]}, GREEDY, "r", {}, ValueError, "prompt.prompt_token_ids"),
        ({"text": "hi"}, GREEDY, "r", {}, ValueError, "prompt has unknown key"),
        ([5] * 200, GREEDY, "r", {}, ValueError, "max_model_len"),
    ],
)
def test_bad_arguments_name_the_field(llm, prompt, params, request_id, kwargs, error, match):
    with pytest.raises(error, match=match):
        asyncio.run(_collect(llm, prompt, params, request_id, **kwargs))
    _assert_idle(llm)


def test_bad_construction_arguments(llama_model_dir):
    with pytest.raises(TypeError, match="engine_args must be an EngineArgs"):
        AsyncLLM.from_engine_args({"model": llama_model_dir})
    with pytest.raises(ValueError, match="max_model_lenn"):
        AsyncLLM(model=llama_model_dir, max_model_lenn=128)


def test_reset_prefix_cache(llm, slow_steps):
    prompt = list(range(1, 41))  # two full blocks of 16 tokens: cacheable

    async def main():
        hits = lambda: llm.engine.get_stats().prefix_cache_hits  # noqa: E731
        await _collect(llm, prompt, GREEDY, "warm")
        before = hits()
        await _collect(llm, prompt, GREEDY, "hit")
        assert hits() - before == 32
        assert await llm.reset_prefix_cache()
        before = hits()
        await _collect(llm, prompt, GREEDY, "miss")
        assert hits() == before
        # refused while a request holds blocks; aborting first frees them
        stream = llm.generate("Hello", LONG, "holding")
        await stream.__anext__()
        assert await llm.reset_prefix_cache() is False
        await llm.abort("holding")
        assert await llm.reset_prefix_cache() is True
        assert (await _last(stream)).outputs[0].finish_reason == "abort"

    asyncio.run(main())
    _assert_idle(llm)


async def _last(gen):
    return [out async for out in gen][-1]


def test_shutdown_stops_the_engine(llama_model_dir):
    async def main():
        async with AsyncLLM(model=llama_model_dir, **ENGINE_KWARGS) as llm:
            assert llm.is_running and not llm.errored and llm.dead_error is None
            await llm.check_health()
            assert (await llm.get_tokenizer()) is llm.engine.tokenizer
            assert (await _collect(llm, "Hi", GREEDY, "r"))[-1].finished
        return llm

    llm = asyncio.run(main())
    assert not llm.is_running and not llm.errored and llm.dead_error is None
    assert not llm.engine._thread.is_alive()

    async def after():
        with pytest.raises(EngineDeadError, match="shut down"):
            await llm.check_health()
        with pytest.raises(EngineDeadError):
            await _collect(llm, "Hi", GREEDY, "late")
        with pytest.raises(EngineDeadError):
            await llm.reset_prefix_cache()

    asyncio.run(after())
    llm.shutdown()  # idempotent


def test_sync_with_and_shutdown_with_a_request_in_flight(llama_model_dir):
    with AsyncLLM(model=llama_model_dir, **ENGINE_KWARGS) as llm:
        real_step = llm.engine.engine.step

        def slow_step():
            time.sleep(0.01)
            return real_step()

        llm.engine.engine.step = slow_step

        async def main():
            stream = llm.generate("Once upon a time", LONG, "in-flight")
            await stream.__anext__()
            await asyncio.to_thread(llm.shutdown)
            return await _last(stream)

        final = asyncio.run(main())
    assert final.outputs[0].finish_reason == "abort"
    assert not llm.is_running


def test_dead_engine_is_reported(llama_model_dir):
    llm = AsyncLLM.from_engine_args(tiny_engine_args(llama_model_dir, **ENGINE_KWARGS))

    def broken_step():
        raise RuntimeError("injected failure")

    llm.engine.engine.step = broken_step

    async def main():
        for i in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
            with pytest.raises(EngineStepError, match="injected failure"):
                await _collect(llm, "Hi", GREEDY, f"r{i}")
        await llm.check_health()  # a failed step alone does not kill the engine
        with pytest.raises(EngineDeadError, match="injected failure"):
            await _collect(llm, "Hi", GREEDY, "last")
        with pytest.raises(EngineDeadError, match="injected failure"):
            await llm.check_health()

    try:
        asyncio.run(main())
        assert llm.errored and not llm.is_running
        assert isinstance(llm.dead_error, RuntimeError)
    finally:
        llm.shutdown()
