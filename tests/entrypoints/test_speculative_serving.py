"""--speculative-config through the server: same completions, and its /metrics counters."""

from __future__ import annotations

import asyncio
import logging

from backplane.core.engine.async_engine import AsyncEngine
from backplane.entrypoints.openai.api_server import log_stats
from tests.entrypoints.server_utils import metric, start_server, tiny_engine_args, wait_until_idle

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
BODY = {"prompt": "one two three four one two three four one two three", "max_tokens": 24,
        "temperature": 0, "ignore_eos": True}


def _complete(running) -> dict:
    with running.client() as c:
        r = c.post("/v1/completions", json=dict(BODY, model="tiny"))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_speculative_config_serves_the_same_text_and_reports_acceptance(
        llama_model_dir, caplog):
    plain = start_server(AsyncEngine.from_engine_args(tiny_engine_args(llama_model_dir, served_model_name="tiny")))
    try:
        want = _complete(plain)
    finally:
        plain.stop()
    running = start_server(AsyncEngine.from_engine_args(
        tiny_engine_args(llama_model_dir, served_model_name="tiny", speculative_config=NGRAM)))
    try:
        assert _complete(running) == want
        text = wait_until_idle(running)
        drafted = metric(text, "backplane:spec_decode_num_draft_tokens_total")
        accepted = metric(text, "backplane:spec_decode_num_accepted_tokens_total")
        assert drafted > 0 and 0 < accepted <= drafted
        assert metric(text, "vllm:spec_decode_num_drafts_total") == metric(
            text, "backplane:spec_decode_num_drafts_total")
        first = metric(text, "backplane:spec_decode_num_accepted_tokens_per_pos_total", position="0")
        assert first > 0
        # The periodic stats line carries the acceptance figures.
        with caplog.at_level(logging.INFO, logger="backplane.entrypoints.openai.api_server"):
            async def one_line():
                task = asyncio.create_task(log_stats(running.engine, interval=0.01))
                await asyncio.sleep(0.1)
                task.cancel()

            asyncio.run(one_line())
        assert "speculative acceptance" in caplog.text
    finally:
        running.stop()
