"""Mistral tool calls: ``[TOOL_CALLS]`` then a JSON array of
``{"name": ..., "arguments": {...}}`` objects.

``[TOOL_CALLS]`` is a special token: the server must detokenize with
``skip_special_tokens=False`` for it to reach the parser.
"""

from __future__ import annotations

import json
import secrets
import string

from backplane.entrypoints.openai.tool_parsers.base import ToolParser, join_outside
from backplane.entrypoints.openai.tool_parsers.json_stream import CallSequence, SequenceStatus
from backplane.entrypoints.openai.tool_parsers.utils import call_from_object, partial_tag_len

TOKEN = "[TOOL_CALLS]"
_ARGS_KEYS = ("arguments",)
_ALNUM = string.ascii_letters + string.digits
_DECODER = json.JSONDecoder()


class MistralToolParser(ToolParser):
    name = "mistral"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._seq: CallSequence | None = None  # set once the array has opened
        self._in_calls = False  # after the token
        self._block = ""  # text after the token, replayed if it is not a call array

    def make_call_id(self) -> str:
        # Mistral's chat template only accepts 9-character alphanumeric ids.
        return "".join(secrets.choice(_ALNUM) for _ in range(9))

    def _parse(self, text: str) -> tuple[list[tuple[str, str]], str | None] | None:
        calls, segments, pos = [], [], 0
        while (i := text.find(TOKEN, pos)) >= 0:
            segments.append(text[pos:i])
            start = i + len(TOKEN)
            start += len(text[start:]) - len(text[start:].lstrip())
            try:
                array, pos = _DECODER.raw_decode(text, start)
            except ValueError:
                return None
            if not isinstance(array, list) or not array:
                return None
            for obj in array:
                call = call_from_object(obj, _ARGS_KEYS)
                if call is None:
                    return None
                calls.append(call)
        segments.append(text[pos:])
        return calls, join_outside(segments)

    def _stream(self, delta_text: str) -> None:
        self._buf += delta_text
        while self._buf:
            if not self._in_calls:
                i = self._buf.find(TOKEN)
                if i < 0:
                    cut = len(self._buf) - partial_tag_len(self._buf, TOKEN)
                    self._emit_content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return
                self._emit_content(self._buf[:i])
                self._buf = self._buf[i + len(TOKEN) :]
                self._in_calls, self._seq, self._block = True, None, ""
            elif self._seq is None:
                rest = self._buf.lstrip()
                if not rest:
                    return
                if rest[0] != "[":
                    self._fail(0)
                    continue
                self._block += self._buf[: len(self._buf) - len(rest) + 1]
                self._buf = rest[1:]
                self._seq = CallSequence(self, _ARGS_KEYS, separators=",", closer="]")
            else:
                n, status = self._seq.feed(self._buf)
                self._block += self._buf[:n]
                self._buf = self._buf[n:]
                if status is SequenceStatus.MORE:
                    return
                if status is SequenceStatus.END:
                    self._in_calls = False
                    self._end_call()
                else:
                    self._fail(n)

    def _fail(self, consumed: int) -> None:
        """The text after the token is not a call array: if nothing was sent
        as a call, it was text all along; otherwise keep what follows as text."""
        started = self._seq is not None and self._seq.started_any
        self._in_calls, self._seq = False, None
        if started:
            self._end_call()
        else:
            self._emit_content(TOKEN + self._block)
        self._block = ""

    def _finish(self) -> None:
        if self._in_calls and not (self._seq and self._seq.started_any):
            self._emit_content(TOKEN + self._block + self._buf)
        elif not self._in_calls:
            self._emit_content(self._buf)
        self._buf, self._in_calls, self._seq = "", False, None
