"""Logging set-up: `BACKPLANE_LOGGING_LEVEL` (default INFO) controls verbosity."""

from __future__ import annotations

import logging
import os
import sys

_configured = False


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and CLIs swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


def configure_logging() -> None:
    """Attach one stderr handler to the `backplane` logger, once per process."""
    global _configured
    if _configured:
        return
    level_name = os.environ.get("BACKPLANE_LOGGING_LEVEL", "INFO").upper()
    level = getattr(logging, level_name, None)
    if not isinstance(level, int):
        raise ValueError(
            f"BACKPLANE_LOGGING_LEVEL={level_name!r} is not one of DEBUG, INFO, WARNING, ERROR"
        )
    logger = logging.getLogger("backplane")
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    _configured = True
