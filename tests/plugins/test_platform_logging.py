"""Every engine logs its platform choice once, naming its source, on the library logger.

``backplane serve`` and ``LLM(...)`` both build an LLMEngine, which logs the
line of `backplane.platforms.log_platform_choice`: ``platform NAME chosen:
REASON``, where the reason says whether the ``device`` argument, the
``BACKPLANE_PLATFORM`` environment variable or auto-detection chose.
"""

from __future__ import annotations

import logging

import pytest

from backplane.platforms import explain_selection, log_platform_choice, resolve_platform

COMMON = dict(dtype="float32", max_model_len=128, num_kv_blocks=32)


@pytest.fixture
def platform_log(caplog, clean_plugin_env):
    """The `backplane.platforms` records at INFO (also after a CLI test configured logging)."""
    # configure_logging() (run by any in-process CLI test) stops propagation to root.
    clean_plugin_env.setattr(logging.getLogger("backplane"), "propagate", True)
    caplog.set_level(logging.INFO, logger="backplane.platforms")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "backplane.platforms" and " chosen: " in r.getMessage()]

    return lines


def test_llm_logs_the_device_argument_as_the_source(platform_log, llama_model_dir):
    from backplane import LLM

    LLM(model=llama_model_dir, device="cpu", **COMMON)
    (line,) = platform_log()
    assert line.startswith(
        "platform cpu chosen: requested by device argument (the CPU is always available)")


def test_llm_logs_backplane_platform_as_the_source(platform_log, llama_model_dir,
                                                    clean_plugin_env):
    from backplane import LLM

    clean_plugin_env.setenv("BACKPLANE_PLATFORM", "cpu")
    LLM(model=llama_model_dir, **COMMON)
    (line,) = platform_log()
    assert line.startswith(
        "platform cpu chosen: requested by BACKPLANE_PLATFORM (the CPU is always available)")


def test_each_engine_logs_once_even_when_the_choice_is_cached(platform_log, llama_model_dir):
    from backplane import LLM

    LLM(model=llama_model_dir, device="cpu", **COMMON)
    LLM(model=llama_model_dir, device="cpu", **COMMON)
    assert len(platform_log()) == 2


def test_auto_detection_is_named(platform_log, llama_model_dir):
    chosen = explain_selection().chosen
    if chosen != "cpu":
        pytest.skip(f"auto-detection picks {chosen} here; the engine test runs on the cpu only")
    from backplane import LLM

    LLM(model=llama_model_dir, **COMMON)
    (line,) = platform_log()
    assert line.startswith("platform cpu chosen: auto-detected: highest-priority available")


def test_log_platform_choice_needs_a_choice(platform_log):
    assert log_platform_choice("cpu") is None and platform_log() == []
    resolve_platform("cpu")
    assert platform_log() == []  # resolving alone logs at DEBUG only
    assert log_platform_choice("cpu").chosen == "cpu"
    assert platform_log() == [explain_selection("cpu").summary()]
