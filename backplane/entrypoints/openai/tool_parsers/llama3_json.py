"""Llama 3.x JSON tool calls: the whole output is one or more
``{"name": ..., "parameters": {...}}`` objects separated by ``;``, optionally
after ``<|python_tag|>``. Output that does not start that way is plain text.
(``"arguments"`` is accepted in place of ``"parameters"``.)
"""

from __future__ import annotations

import json

from backplane.entrypoints.openai.tool_parsers.base import ToolParser
from backplane.entrypoints.openai.tool_parsers.json_stream import CallSequence, SequenceStatus
from backplane.entrypoints.openai.tool_parsers.utils import call_from_object

PYTHON_TAG = "<|python_tag|>"
_ARGS_KEYS = ("arguments", "parameters")
_SEPARATORS = ";"
_DECODER = json.JSONDecoder()


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def __init__(self) -> None:
        super().__init__()
        self._text = ""  # everything received, replayed as text if no call is found
        self._buf = ""
        self._mode = "decide"  # -> "calls" or "text"
        self._seq = CallSequence(self, _ARGS_KEYS, separators=_SEPARATORS)

    def _parse(self, text: str) -> tuple[list[tuple[str, str]], str | None] | None:
        body = text.lstrip()
        body = body.removeprefix(PYTHON_TAG)
        if not body.lstrip().startswith("{"):
            return None
        calls, pos = [], 0
        while True:
            while pos < len(body) and (body[pos].isspace() or body[pos] in _SEPARATORS):
                pos += 1
            if pos == len(body):
                return calls, None
            try:
                obj, pos = _DECODER.raw_decode(body, pos)
            except ValueError:
                return None
            call = call_from_object(obj, _ARGS_KEYS)
            if call is None:
                return None
            calls.append(call)

    def _stream(self, delta_text: str) -> None:
        self._text += delta_text
        if self._mode == "text":
            self._emit_content(delta_text)
            return
        self._buf += delta_text
        if self._mode == "decide":
            head = self._buf.lstrip()
            if head.startswith(PYTHON_TAG):
                head = head[len(PYTHON_TAG) :]
            elif PYTHON_TAG.startswith(head):
                return  # blank so far, or a partial tag
            elif not head.startswith("{"):
                self._to_text(self._text)
                return
            self._mode, self._buf = "calls", head
        n, status = self._seq.feed(self._buf)
        rest, self._buf = self._buf[n:], ""
        if status is SequenceStatus.FAIL:
            # Not calls after all (nothing sent yet: all of it is text), or
            # junk after the calls (keep it as text).
            self._to_text(rest if self._seq.started_any else self._text)

    def _to_text(self, text: str) -> None:
        self._mode = "text"
        self._emit_content(text)

    def _finish(self) -> None:
        if self._mode == "decide":
            self._emit_content(self._text)
        elif self._mode == "calls" and not self._seq.started_any:
            self._emit_content(self._text)
        self._mode = "done"
