"""Streaming of ``tool_choice="required"`` output: a JSON array of ``{"name", "parameters"}``.

The structured-output constraint guarantees the shape, so unlike the model
parsers there is no free text to fall back to: the array is followed as it
grows (`CallSequence`), each call's header goes out once its name is known and
its parameters stream as the raw text the model writes. Not a user-facing
parser (not in the registry): the chat handler uses it for forced calls.
"""

from __future__ import annotations

from backplane.entrypoints.openai.tool_parsers.base import ToolParser
from backplane.entrypoints.openai.tool_parsers.json_stream import CallSequence, SequenceStatus

# The key the forced-call schema puts each call's arguments under (vLLM's choice).
PARAMETERS_KEY = "parameters"


class ForcedCallArrayStream(ToolParser):
    """Incremental deltas of a constrained ``[{"name": ..., "parameters": {...}}, ...]``."""

    name = "forced_call_array"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._seq: CallSequence | None = None
        self._ended = False

    def _stream(self, delta_text: str) -> None:
        if self._ended:
            return
        self._buf += delta_text
        if self._seq is None:
            rest = self._buf.lstrip()
            if not rest:
                return
            if rest[0] != "[":
                self._ended = True  # not the constrained shape: nothing to stream
                return
            self._buf = rest[1:]
            self._seq = CallSequence(self, (PARAMETERS_KEY,), separators=",", closer="]")
        consumed, status = self._seq.feed(self._buf)
        self._buf = self._buf[consumed:]
        if status is not SequenceStatus.MORE:
            self._ended = True
            self._end_call()

    @property
    def calls_started(self) -> int:
        """Calls whose header was sent so far."""
        return self._calls_started

    def _finish(self) -> None:
        self._buf = ""
