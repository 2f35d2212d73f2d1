"""Turning request text into token ids off the event loop, with bounded cost.

Tokenizing a long prompt or rendering a chat template is CPU work that would
stall every other connection if it ran on the server's event loop (a 10 MB
prompt blocked /health for seconds). Here it runs on one worker thread (one,
because transformers' fast tokenizers are not safe to call from several
threads at once), and its cost is bounded:

- A prompt far longer than ``max_model_len`` tokens could ever be is refused
  from its length in characters, before any tokenization: no token of the
  vocabulary covers more than ``max_token_chars`` characters, so a text longer
  than ``max_model_len * max_token_chars * slack`` cannot fit.
- Chat templates (Jinja) render under a deadline: a trace hook on the worker
  thread stops a template that runs longer than ``template_timeout_s``.
  Templates sent in a request are refused unless the server was started with
  ``--trust-request-chat-template``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from backplane.entrypoints.openai.errors import bad_request

# Normalisers may fold several characters into one (combining marks), so the
# character bound allows this many characters per vocabulary character.
_CHARS_SLACK = 4
# The deadline is checked every this many traced lines (a clock read is not free).
_TRACE_CHECK_EVERY = 256


class TemplateTimeout(Exception):
    """A chat template ran past its deadline."""


def run_with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """Call ``fn()`` on this thread, raising TemplateTimeout once ``seconds`` have passed.

    Only Python code is interrupted (Jinja templates compile to Python); the
    trace hook is removed again whatever happens.
    """
    deadline = time.monotonic() + seconds
    lines = 0

    def local(_frame, _event, _arg):
        nonlocal lines
        lines += 1
        if lines % _TRACE_CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise TemplateTimeout()
        return local

    previous = sys.gettrace()
    sys.settrace(lambda _frame, _event, _arg: local)
    try:
        return fn()
    finally:
        sys.settrace(previous)


def _message_dict(message, index: int) -> dict:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"messages[{index}].content: only text parts are supported, got "
                    f"type {part.get('type')!r}",
                    "messages",
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    out = message.model_dump(exclude_none=True)
    out["content"] = content if content is not None else ""
    for call in out.get("tool_calls") or ():
        # OpenAI sends the arguments as a JSON string; chat templates (Llama 3.1,
        # Hermes, Mistral...) expect the object (``arguments | tojson``), as vLLM passes it.
        args = call["function"].get("arguments")
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                call["function"]["arguments"] = parsed
    return out


def render_chat_prompt(
    tokenizer,
    messages: list,
    *,
    chat_template: str | None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict | None = None,
    tools: list | None = None,
    timeout_s: float | None = None,
    add_special_tokens: bool = False,
) -> tuple[str, list[int]]:
    """The prompt text and token ids of a conversation, through the chat template.

    Blocking: call it through `PromptProcessor.render_chat` from async code.
    Raises a 400 when the tokenizer has no template, the template rejects the
    conversation (e.g. roles that do not alternate) or runs past ``timeout_s``.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise bad_request(
            "this model's tokenizer has no chat template; use /v1/completions, or start the "
            "server with --chat-template FILE",
            "messages",
        )
    if add_generation_prompt and continue_final_message:
        raise bad_request(
            "add_generation_prompt and continue_final_message cannot both be true",
            "continue_final_message",
        )
    conversation = [_message_dict(m, i) for i, m in enumerate(messages)]
    render = functools.partial(
        tokenizer.apply_chat_template,
        conversation,
        chat_template=template,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **(template_kwargs or {}),
    )
    try:
        text = run_with_deadline(render, timeout_s) if timeout_s else render()
    except TemplateTimeout:
        raise bad_request(
            f"the chat template took longer than {timeout_s:g} s to render and was stopped",
            "messages",
        ) from None
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise bad_request(f"chat template failed on these messages: {exc}", "messages") from None
    # The template already places BOS and other special tokens where the model expects
    # them; add_special_tokens (vLLM's chat field) adds the tokenizer's on top.
    ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    return text, list(ids)


def _content_chars(content) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


class PromptProcessor:
    """Tokenization and chat rendering for the server, on one worker thread.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        max_model_len: the engine's limit on prompt + output tokens.
        template_timeout_s: longest a chat template may render.
    """

    def __init__(self, tokenizer, max_model_len: int, template_timeout_s: float = 2.0) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.template_timeout_s = template_timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="backplane-tokenizer"
        )

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters any one token of the vocabulary stands for."""
        vocab = self.tokenizer.get_vocab()
        return max((len(token) for token in vocab), default=1) or 1

    def char_limit(self, num_tokens: int) -> int:
        """More characters than this cannot tokenize to ``num_tokens`` tokens or fewer."""
        return num_tokens * self.max_token_chars * _CHARS_SLACK

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking tokenizer work on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def tokenize(
        self,
        text: str,
        field: str,
        *,
        add_special_tokens: bool = True,
        truncate_to: int | None = None,
    ) -> list[int]:
        """Token ids of ``text``; 400 naming ``field`` if it cannot fit in max_model_len.

        With ``truncate_to`` only the last that many tokens are kept (and only the
        tail of a very long text is tokenized).
        """
        if truncate_to is not None:
            keep = self.char_limit(truncate_to)
            if len(text) > keep:
                text = text[-keep:]
        elif len(text) > self.char_limit(self.max_model_len):
            raise bad_request(
                f"{field} is too long: {len(text)} characters cannot fit in max_model_len "
                f"({self.max_model_len} tokens); shorten the prompt",
                field,
            )
        ids = await self.run(self._encode, text, add_special_tokens)
        if truncate_to is not None and len(ids) > truncate_to:
            ids = ids[-truncate_to:]
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    async def render_chat(self, messages: list, **kwargs: Any) -> tuple[str, list[int]]:
        """`render_chat_prompt` on the worker thread, under the template deadline."""
        total = sum(_content_chars(m.content) for m in messages)
        if total > self.char_limit(self.max_model_len):
            raise bad_request(
                f"messages are too long: {total} characters cannot fit in max_model_len "
                f"({self.max_model_len} tokens)",
                "messages",
            )
        return await self.run(
            render_chat_prompt,
            self.tokenizer,
            messages,
            timeout_s=self.template_timeout_s,
            **kwargs,
        )

    def close(self) -> None:
        """Stop the worker thread (pending work is dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
