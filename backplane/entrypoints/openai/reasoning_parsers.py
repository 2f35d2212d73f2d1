"""Reasoning parsers: split a model's output into ``reasoning_content`` (the
chain of thought between ``<think>`` and ``</think>``) and ``content``.

* ``deepseek_r1``: everything up to ``</think>`` is reasoning; the opening
  ``<think>`` is optional because DeepSeek-R1's chat template may already
  have put it in the prompt. Without ``</think>`` the whole output is
  reasoning (the model was cut off while thinking).
* ``qwen3``: reasoning only when the output opens with an explicit
  ``<think>`` (Qwen3 with thinking enabled); otherwise, e.g. with
  ``enable_thinking=False``, the whole output is content. An unclosed
  ``<think>`` makes the rest reasoning, as when streaming.

One parser instance per request (``get_reasoning_parser(name)()``): the
streaming methods keep state.
"""

from __future__ import annotations

from typing import ClassVar

from backplane.entrypoints.openai.tool_parsers.utils import partial_tag_len

START, END = "<think>", "</think>"


class ReasoningParser:
    name: ClassVar[str]
    # Whether output that does not open with <think> is reasoning anyway.
    implicit_start: ClassVar[bool]

    def __init__(self) -> None:
        self._buf = ""
        self._state = "start"  # -> "reasoning" -> "content"

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """``(reasoning_content, content)`` of a complete output."""
        head = text.lstrip()
        if head.startswith(START):
            text = head[len(START) :]
        elif not self.implicit_start:
            return None, text or None
        reasoning, closed, content = text.partition(END)
        return reasoning or None, (content or None) if closed else None

    def extract_streaming(
        self, previous_text: str, delta_text: str
    ) -> tuple[str | None, str | None]:
        """``(reasoning_delta, content_delta)`` for the next piece of output.

        ``previous_text`` is accepted for parity with vLLM's signature; the
        parser keeps its own copy of what it has seen.
        """
        if self._state == "content":
            return None, delta_text or None
        self._buf += delta_text
        reasoning = ""
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(START):
                self._buf, self._state = head[len(START) :], "reasoning"
            elif START.startswith(head):
                return None, None  # blank so far, or a partial <think>
            elif self.implicit_start:
                self._state = "reasoning"
            else:
                self._state = "content"
                content, self._buf = self._buf, ""
                return None, content or None
        i = self._buf.find(END)
        if i < 0:
            # Hold back what may be the start of </think>.
            cut = len(self._buf) - partial_tag_len(self._buf, END)
            reasoning, self._buf = self._buf[:cut], self._buf[cut:]
            return reasoning or None, None
        reasoning, content = self._buf[:i], self._buf[i + len(END) :]
        self._buf, self._state = "", "content"
        return reasoning or None, content or None

    def finish(self) -> tuple[str | None, str | None]:
        """End of output: release text held back in case it began a tag."""
        rest, self._buf = self._buf, ""
        if self._state == "reasoning" or (self._state == "start" and self.implicit_start):
            return rest or None, None
        return None, rest or None


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    implicit_start = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    implicit_start = False


_REGISTRY: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}
# The values accepted by --reasoning-parser.
REASONING_PARSERS: tuple[str, ...] = tuple(sorted(_REGISTRY))


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered as ``name``; instantiate it once per request."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; valid ones: {', '.join(REASONING_PARSERS)}"
        ) from None
