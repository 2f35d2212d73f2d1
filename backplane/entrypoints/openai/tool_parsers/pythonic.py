"""Pythonic tool calls (Llama 3.2 / Llama 4 / ToolACE style): the whole
output is a Python list of calls with keyword arguments whose values are
literals, e.g. ``[get_weather(city='Paris', unit="c"), get_time()]``.

Parsed with :mod:`ast` (``ast.literal_eval`` for the values): nothing is
ever evaluated.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from backplane.entrypoints.openai.tool_parsers.base import ToolParser

# Output that starts like this is a call list; anything else is text.
_CALL_LIST_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
# ... and while the output is still a prefix of that, we cannot tell yet.
_MAYBE_CALL_LIST_START = re.compile(r"\[\s*(?:[A-Za-z_][\w.]*\s*)?")
_IDENT_START = re.compile(r"[A-Za-z_]")
_IDENT_CHAR = re.compile(r"[\w.]")


def _json_value(value: Any) -> str:
    # allow_nan=False: NaN / Infinity would make the arguments invalid JSON.
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and _call_name(func.value) is not None:
        return f"{_call_name(func.value)}.{func.attr}"
    return None


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def __init__(self) -> None:
        super().__init__()
        self._text = ""  # everything received
        self._mode = "decide"  # -> "calls", then "text" (not a call list, or after it)
        self._scan = _CallListScanner(self)

    def _parse(self, text: str) -> tuple[list[tuple[str, str]], str | None] | None:
        source = text.strip()
        if not _CALL_LIST_START.match(source):
            return None
        tree = ast.parse(source, mode="eval").body
        if not isinstance(tree, ast.List):
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or node.args:
                return None
            name = _call_name(node.func)
            if name is None or any(kw.arg is None for kw in node.keywords):
                return None
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            calls.append((name, _json_value(args)))
        return calls, None

    def _stream(self, delta_text: str) -> None:
        self._text += delta_text
        if self._mode == "text":
            self._emit_content(delta_text)
            return
        if self._mode == "decide":
            head = self._text.lstrip()
            if _CALL_LIST_START.match(head):
                self._mode = "calls"
                delta_text = head
            elif _MAYBE_CALL_LIST_START.fullmatch(head) or not head:
                return
            else:
                self._to_text(self._text)
                return
        rest = self._scan.feed(delta_text)
        if rest is not None:
            self._to_text(rest if self._scan.started_any else self._text)

    def _to_text(self, text: str) -> None:
        self._mode = "text"
        self._emit_content(text)

    def _finish(self) -> None:
        if self._mode == "decide" or (self._mode == "calls" and not self._scan.started_any):
            self._emit_content(self._text)
        self._mode = "done"


class _CallListScanner:
    """Follows ``[name(key=value, ...), ...]`` as it arrives.

    A call's header is sent once its first argument (or its closing
    parenthesis) has been checked, so that text merely resembling a call
    list is not announced as a call; each argument is then sent as a JSON
    fragment as soon as its value is complete, giving exactly the text
    ``json.dumps`` produces for the whole arguments object.
    """

    def __init__(self, parser: PythonicToolParser) -> None:
        self._parser = parser
        self._src = ""
        self._i = 0
        self._state = "open"  # open, item, name, args, key, equals, value, after_call, end
        self._mark = 0  # start of the current name / key / value
        self._name = ""
        self._key = ""
        self._args: list[str] = []  # JSON "key": value pairs of the current call
        self._index: int | None = None
        self._depth = 0  # brackets open inside the current value
        self._quote = ""  # the quote (', ", ''' or \"\"\") of the string we are in
        self.started_any = False

    def feed(self, text: str) -> str | None:
        """Consume ``text``; None while the call list goes on, else the text
        after the point where it ended or stopped making sense."""
        self._src += text
        src = self._src
        while self._i < len(src):
            ch = src[self._i]
            if self._state == "value":
                if not self._step_value(src):
                    return None  # a quote needs the next characters to be read
                continue
            if self._state == "end":
                return src[self._i :]
            if not self._step(ch):
                return src[self._i :]
            self._i += 1
        return None

    def _step(self, ch: str) -> bool:
        s = self._state
        if s in ("name", "key") and _IDENT_CHAR.match(ch):
            return True
        if s == "name":
            self._name = self._src[self._mark : self._i].strip()
            self._state = "name_done"
            s = "name_done"
        elif s == "key":
            self._key = self._src[self._mark : self._i].strip()
            self._state = "key_done"
            s = "key_done"
        if ch.isspace():
            return True
        if s == "open" and ch == "[":
            self._state = "item"
        elif s == "item" and _IDENT_START.match(ch):
            self._state, self._mark = "name", self._i
        elif s == "name_done" and ch == "(":
            self._state, self._args, self._index = "args", [], None
        elif s == "args" and _IDENT_START.match(ch):
            self._state, self._mark = "key", self._i
        elif s == "args" and ch == ")":  # no arguments, or a trailing comma
            self._close_call()
        elif s == "key_done" and ch == "=":
            self._state, self._mark, self._depth, self._quote = "value", self._i + 1, 0, ""
        elif s == "after_call" and ch == ",":
            self._state = "item"
        elif s in ("after_call", "item") and ch == "]" and self.started_any:
            self._state = "end"  # "item": after a trailing comma
        else:
            return False
        return True

    def _step_value(self, src: str) -> bool:
        """Advance through a Python literal; False when more text is needed."""
        ch = src[self._i]
        if self._quote:
            if ch == "\\":
                if self._i + 1 >= len(src):
                    return False
                self._i += 2
                return True
            if src.startswith(self._quote, self._i):
                self._i += len(self._quote)
                self._quote = ""
                return True
            if ch == self._quote[0] and len(self._quote) == 3 and len(src) - self._i < 3:
                return False  # maybe the closing triple quote, cut short
            self._i += 1
            return True
        if ch in "'\"":
            if len(src) - self._i < 3:
                return False  # cannot tell ' from ''' yet
            self._quote = ch * 3 if src.startswith(ch * 3, self._i) else ch
            self._i += len(self._quote)
            return True
        if ch in "([{":
            self._depth += 1
        elif ch in ")]}" and self._depth:
            self._depth -= 1
        elif ch in ",)" and not self._depth:
            if not self._argument_done(src[self._mark : self._i]):
                self._state = "end_bad"
                return True
            if ch == ")":
                self._close_call()
            else:
                self._state = "args"
        self._i += 1
        return True

    def _argument_done(self, value_src: str) -> bool:
        try:
            value = _json_value(ast.literal_eval(value_src.strip()))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False
        pair = f"{json.dumps(self._key, ensure_ascii=False)}: {value}"
        fragment = ("{" if not self._args else ", ") + pair
        self._args.append(pair)
        self._send(fragment)
        return True

    def _send(self, fragment: str) -> None:
        if self._index is None:
            self._index = self._parser._start_call(self._name)
            self.started_any = True
        self._parser._emit_arguments(self._index, fragment)

    def _close_call(self) -> None:
        self._send("}" if self._args else "{}")
        self._parser._end_call()
        self._state = "after_call"
