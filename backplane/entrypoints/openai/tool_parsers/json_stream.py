"""Incremental scanning of one ``{"name": ..., "arguments": {...}}`` object.

Streaming parsers cannot wait for a whole JSON object before sending the
call's arguments, and a partial object cannot be decoded. The scanner below
follows the object character by character, just far enough to know where
each top-level value starts and ends; the arguments object is then streamed
as the raw text the model wrote (which decodes to the same value as the
non-streaming result).
"""

from __future__ import annotations

import json
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

from backplane.entrypoints.openai.tool_parsers.utils import arguments_json

if TYPE_CHECKING:
    from backplane.entrypoints.openai.tool_parsers.base import ToolParser

_WS = frozenset(" \t\r\n")
# Characters of numbers and of true / false / null.
_SCALAR = frozenset("0123456789+-.eEtrufalsn")
_CLOSER = {"{": "}", "[": "]"}


class _S(Enum):
    START = auto()  # before the opening brace
    KEY_OR_END = auto()  # right after "{"
    KEY = auto()  # after ","
    KEY_STR = auto()
    COLON = auto()
    VALUE = auto()
    VAL_STR = auto()
    VAL_CONTAINER = auto()
    VAL_SCALAR = auto()
    AFTER_VALUE = auto()
    DONE = auto()
    ERROR = auto()


class JsonObjectScanner:
    """Follows one JSON object fed in pieces; records each top-level value's span.

    The check is lexical (quotes, escapes, bracket matching, allowed
    characters), enough to notice that the text is not JSON early, e.g. a
    closing tag that arrives while the object is still open.
    """

    def __init__(self) -> None:
        self.text = ""  # everything consumed, from the first character fed
        self.spans: dict[str, list[int | None]] = {}  # key -> [start, end or None]
        self._state = _S.START
        self._key_start = 0
        self._key = ""
        self._stack: list[str] = []
        self._in_str = False
        self._esc = False

    @property
    def done(self) -> bool:
        return self._state is _S.DONE

    @property
    def error(self) -> bool:
        return self._state is _S.ERROR

    def feed(self, chunk: str) -> int:
        """Consume ``chunk``; return how many characters belong to the object
        (fewer than ``len(chunk)`` once it is closed or found malformed)."""
        base = len(self.text)
        self.text += chunk
        for k in range(len(chunk)):
            if not self._step(self.text[base + k], base + k):
                self.text = self.text[: base + k]
                return k
        return len(chunk)

    def value(self, key: str) -> Any:
        """The decoded value of a complete top-level ``key``, else None."""
        span = self.spans.get(key)
        if span is None or span[1] is None:
            return None
        try:
            return json.loads(self.text[span[0] : span[1]])
        except ValueError:
            return None

    def _string_end(self, ch: str) -> bool:
        """Advance the escape state inside a string; True at its closing quote."""
        if self._esc:
            self._esc = False
        elif ch == "\\":
            self._esc = True
        elif ch == '"':
            return True
        return False

    def _step(self, ch: str, i: int) -> bool:
        s = self._state
        if s is _S.DONE or s is _S.ERROR:
            return False
        if s is _S.VAL_STR:
            if self._string_end(ch):
                self.spans[self._key][1] = i + 1
                self._state = _S.AFTER_VALUE
            return True
        if s is _S.KEY_STR:
            if self._string_end(ch):
                try:
                    self._key = json.loads(self.text[self._key_start : i + 1])
                except ValueError:
                    self._state = _S.ERROR
                    return False
                self._state = _S.COLON
            return True
        if s is _S.VAL_CONTAINER:
            return self._step_container(ch, i)
        if s is _S.VAL_SCALAR:
            if ch in _SCALAR:
                return True
            self.spans[self._key][1] = i
            self._state = _S.AFTER_VALUE
            return self._step(ch, i)
        if ch in _WS:
            return True
        if s is _S.START and ch == "{":
            self._state = _S.KEY_OR_END
        elif s in (_S.KEY_OR_END, _S.KEY) and ch == '"':
            self._state, self._key_start, self._esc = _S.KEY_STR, i, False
        elif (s is _S.KEY_OR_END or s is _S.AFTER_VALUE) and ch == "}":
            self._state = _S.DONE
        elif s is _S.COLON and ch == ":":
            self._state = _S.VALUE
        elif s is _S.AFTER_VALUE and ch == ",":
            self._state = _S.KEY
        elif s is _S.VALUE and (ch in _CLOSER or ch == '"' or ch in _SCALAR):
            self.spans[self._key] = [i, None]
            if ch in _CLOSER:
                self._stack, self._in_str = [_CLOSER[ch]], False
                self._state = _S.VAL_CONTAINER
            elif ch == '"':
                self._state, self._esc = _S.VAL_STR, False
            else:
                self._state = _S.VAL_SCALAR
        else:
            self._state = _S.ERROR
            return False
        return True

    def _step_container(self, ch: str, i: int) -> bool:
        if self._in_str:
            if self._string_end(ch):
                self._in_str = False
        elif ch == '"':
            self._in_str, self._esc = True, False
        elif ch in _CLOSER:
            self._stack.append(_CLOSER[ch])
        elif ch in "}]":
            if self._stack.pop() != ch:
                self._state = _S.ERROR
                return False
            if not self._stack:
                self.spans[self._key][1] = i + 1
                self._state = _S.AFTER_VALUE
        elif not (ch in _WS or ch in _SCALAR or ch in ":,"):
            self._state = _S.ERROR
            return False
        return True


class StreamedJsonCall:
    """One JSON tool call being streamed: sends the header once the name is
    known, then the arguments as they arrive."""

    def __init__(self, parser: ToolParser, args_keys: tuple[str, ...]) -> None:
        self.scanner = JsonObjectScanner()
        self._parser = parser
        self._args_keys = args_keys
        self.index: int | None = None
        self._sent = 0  # characters of the raw arguments already sent
        self._sent_whole = False
        self._rejected = False

    @property
    def started(self) -> bool:
        return self.index is not None

    def feed(self, chunk: str) -> int:
        n = self.scanner.feed(chunk)
        self._progress()
        return n

    def _progress(self) -> None:
        sc = self.scanner
        if self._rejected or self._sent_whole:
            return
        key = next((k for k in self._args_keys if k in sc.spans), None)
        if key is None:
            return
        start, end = sc.spans[key]
        if self.index is None:
            name = sc.value("name")
            if not isinstance(name, str):
                return
            if sc.text[start] != "{":
                # A string holding JSON (or junk): usable only once complete.
                if end is None:
                    return
                args = arguments_json(sc.value(key))
                if args is None:
                    self._rejected = True
                    return
                self.index = self._parser._start_call(name)
                self._parser._emit_arguments(self.index, args)
                self._sent_whole = True
                return
            self.index = self._parser._start_call(name)
        stop = len(sc.text) if end is None else end
        fragment = sc.text[start + self._sent : stop]
        self._sent += len(fragment)
        self._parser._emit_arguments(self.index, fragment)


class SequenceStatus(Enum):
    MORE = auto()  # everything consumed, waiting for more text
    END = auto()  # the closing character was consumed
    FAIL = auto()  # the text is not (or no longer) a call sequence


class CallSequence:
    """Tool-call objects separated by ``separators`` (and whitespace),
    optionally ended by ``closer``: the body of ``[{...}, {...}]`` or of
    ``{...}; {...}``."""

    def __init__(
        self,
        parser: ToolParser,
        args_keys: tuple[str, ...],
        separators: str,
        closer: str | None = None,
    ) -> None:
        self._parser = parser
        self._args_keys = args_keys
        self._separators = separators
        self._closer = closer
        self._call: StreamedJsonCall | None = None
        self.started_any = False

    def feed(self, text: str) -> tuple[int, SequenceStatus]:
        """Consume ``text``; returns how much was consumed and why it stopped."""
        pos = 0
        while pos < len(text):
            if self._call is not None:
                pos += self._call.feed(text[pos:])
                call, sc = self._call, self._call.scanner
                self.started_any = self.started_any or call.started
                if sc.error or (sc.done and not call.started):
                    return pos, SequenceStatus.FAIL
                if not sc.done:
                    return pos, SequenceStatus.MORE
                self._call = None
                continue
            ch = text[pos]
            if ch in _WS or ch in self._separators:
                pos += 1
            elif ch == "{":
                self._call = StreamedJsonCall(self._parser, self._args_keys)
            elif ch == self._closer and self.started_any:
                return pos + 1, SequenceStatus.END
            else:
                return pos, SequenceStatus.FAIL
        return pos, SequenceStatus.MORE
