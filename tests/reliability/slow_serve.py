"""`backplane serve` whose engine steps are slowed down, for the shutdown-under-load test.

    python -m tests.reliability.slow_serve serve MODEL --port N ...

The same as ``python -m backplane.entrypoints.cli.main``, except that each
engine step first sleeps ``RELIABILITY_TEST_STEP_DELAY_S`` seconds (default
0.02): the tiny test model makes hundreds of tokens a second, so without the
delay no stream it can hold (max_model_len 512) outlasts a grace period of a
couple of seconds. Everything else (signal handling, the drain, the exit
status) is the real command's.
"""

from __future__ import annotations

import os
import sys
import time

from backplane.core.engine.llm_engine import LLMEngine
from backplane.entrypoints.cli.main import main

# Not BACKPLANE_*: the server warns about environment variables of that prefix it
# does not know.
DELAY_ENV = "RELIABILITY_TEST_STEP_DELAY_S"


def slow_down_steps(delay_s: float) -> None:
    """Make every LLMEngine.step sleep ``delay_s`` seconds before it runs."""
    real_step = LLMEngine.step

    def step(self):
        time.sleep(delay_s)
        return real_step(self)

    LLMEngine.step = step


if __name__ == "__main__":
    slow_down_steps(float(os.environ.get(DELAY_ENV, "0.02")))
    sys.exit(main())
