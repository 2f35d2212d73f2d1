"""Small text and JSON helpers shared by the parsers."""

from __future__ import annotations

import json
from typing import Any


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``.

    A streaming parser holds that many characters back: the next delta may
    complete the tag (``"<tool_"`` + ``"call>"``).
    """
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def arguments_json(value: Any) -> str | None:
    """The ``arguments`` string of a call, or None if ``value`` is not usable.

    Models write the arguments as an object; some write them as a string
    holding JSON, which is accepted when it decodes to an object.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def call_from_object(obj: Any, args_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """``(name, arguments_json)`` from a decoded ``{"name": ..., <args key>: ...}``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            args = arguments_json(obj[key])
            return None if args is None else (obj["name"], args)
    return None
