"""Hermes / Qwen tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Calls may be preceded, separated and followed by ordinary text.
"""

from __future__ import annotations

import json
import re

from backplane.entrypoints.openai.tool_parsers.base import ToolParser, join_outside
from backplane.entrypoints.openai.tool_parsers.json_stream import StreamedJsonCall
from backplane.entrypoints.openai.tool_parsers.utils import call_from_object, partial_tag_len

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_ARGS_KEYS = ("arguments",)


class HermesToolParser(ToolParser):
    name = "hermes"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""  # received, not yet processed
        self._call: StreamedJsonCall | None = None  # set between the tags
        self._block = ""  # body of the current block, replayed as text if invalid

    def _parse(self, text: str) -> tuple[list[tuple[str, str]], str | None] | None:
        calls, segments, pos = [], [], 0
        for m in _BLOCK.finditer(text):
            segments.append(text[pos : m.start()])
            try:
                call = call_from_object(json.loads(m.group(1)), _ARGS_KEYS)
            except ValueError:
                return None
            if call is None:
                return None
            calls.append(call)
            pos = m.end()
        segments.append(text[pos:])
        if any(OPEN in seg for seg in segments):  # a block that never closes
            return None
        return calls, join_outside(segments)

    def _stream(self, delta_text: str) -> None:
        self._buf += delta_text
        while True:
            tag = CLOSE if self._call else OPEN
            i = self._buf.find(tag)
            if i < 0:
                # Hold back what may be the start of the tag.
                cut = len(self._buf) - partial_tag_len(self._buf, tag)
                self._take(self._buf[:cut])
                self._buf = self._buf[cut:]
                return
            self._take(self._buf[:i])
            self._buf = self._buf[i + len(tag) :]
            if self._call:
                self._close_block()
            else:
                self._call = StreamedJsonCall(self, _ARGS_KEYS)
                self._block = ""

    def _take(self, text: str) -> None:
        if self._call is None:
            self._emit_content(text)
            return
        self._block += text
        # After the object (or an error) the scanner consumes nothing more;
        # whatever else sits inside the block is not part of the call.
        self._call.feed(text)

    def _close_block(self) -> None:
        call, self._call = self._call, None
        if call.started:
            self._end_call()
        else:
            # Not a tool call after all: the block was text.
            self._emit_content(OPEN + self._block + CLOSE)

    def _finish(self) -> None:
        if self._call is not None and not self._call.started:
            self._emit_content(OPEN + self._block + self._buf)
        elif self._call is None:
            self._emit_content(self._buf)
        self._call, self._buf = None, ""
