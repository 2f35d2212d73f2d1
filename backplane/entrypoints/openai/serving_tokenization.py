"""``POST /tokenize`` and ``POST /detokenize`` with the served model's tokenizer."""

from __future__ import annotations

from backplane.entrypoints.openai.errors import bad_request
from backplane.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from backplane.entrypoints.openai.serving_chat import render_chat_prompt
from backplane.entrypoints.openai.serving_common import ServingContext


class TokenizationServing:
    """Handlers of the tokenizer endpoints (no engine step involved)."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of chat messages rendered by the chat template."""
        ctx = self.ctx
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            _, ids = render_chat_prompt(
                ctx.tokenizer,
                req.messages,
                chat_template=ctx.chat_template,
                add_generation_prompt=req.add_generation_prompt,
            )
        else:
            ids = list(
                ctx.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
            )
        strs = ctx.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=ctx.max_model_len, tokens=ids, token_strs=strs
        )

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """The text of a list of token ids."""
        ctx = self.ctx
        ctx.check_model(req.model)
        ctx.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens))
