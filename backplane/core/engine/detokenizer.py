"""Incremental detokenization and stop-string handling for one sequence."""

from __future__ import annotations

# Prompt tokens kept as left context when decoding output tokens, so that
# tokenizers which drop a leading space on the first token decode correctly.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, a delta at a time.

    Decodes a short window (prefix_offset..end) and emits only what the window
    adds beyond the text it had before, so each step costs a few tokens rather
    than the whole output. Text ending in an incomplete UTF-8 sequence (U+FFFD)
    is held until the next token completes it.

    Stop strings end the sequence; the text is cut before the stop string (or
    after it with include_stop_str_in_output). While unfinished, ``visible_text``
    holds back any tail that could still grow into a stop string, so streamed
    text never has to be taken back.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in stop), default=0)
        # Fast tokenizers decode in Rust: call it directly, skipping transformers'
        # Python wrapper (two decodes per token per sequence add up at batch 64).
        # Its only extra work for them is the clean-up of tokenization spaces, so
        # tokenizers that ask for that keep the wrapper.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast_decode = None
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._fast_decode = backend.decode
        context = prompt_token_ids[-_CONTEXT_TOKENS:]
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string if one now ends the text, else None."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            before = len(self.text)
            self.text += full_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stop:
                return self._check_stop(before)
        return None

    def flush(self) -> None:
        """At the end of generation, emit text held back for an incomplete character."""
        if self.read_offset < len(self.ids) and self.stopped_by is None:
            prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :]
            self.prefix_offset = self.read_offset = len(self.ids)

    def _check_stop(self, previous_len: int) -> str | None:
        search_from = max(0, previous_len - self.max_stop_len + 1)
        best = None
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
        self.stopped_by = stop
        return stop

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: everything when finished, else minus a possible stop prefix."""
        if finished or not self.stop:
            return self.text
        hold = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:length]):
                    hold = length
                    break
        return self.text[: len(self.text) - hold] if hold else self.text
