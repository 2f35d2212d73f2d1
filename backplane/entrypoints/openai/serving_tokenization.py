"""``POST /tokenize`` and ``POST /detokenize`` with the served model's tokenizer."""

from __future__ import annotations

from backplane.entrypoints.openai.errors import bad_request
from backplane.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from backplane.entrypoints.openai.serving_common import ServingContext


class TokenizationServing:
    """Handlers of the tokenizer endpoints (no engine step involved)."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of chat messages rendered by the chat template.

        Messages are rendered exactly as /v1/chat/completions renders them,
        including ``chat_template`` (with --trust-request-chat-template),
        ``chat_template_kwargs`` and ``tools`` (passed to the template).
        """
        ctx = self.ctx
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            template_kwargs = dict(req.chat_template_kwargs or {})
            _, ids = await ctx.prompts.render_chat(
                req.messages,
                chat_template=ctx.chat_template_for(req.chat_template, template_kwargs),
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                template_kwargs=template_kwargs,
                tools=req.tools,
            )
        else:
            ids = await ctx.prompts.tokenize(
                req.prompt, "prompt", add_special_tokens=req.add_special_tokens
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
