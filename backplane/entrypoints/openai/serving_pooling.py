"""``/v1/embeddings``, ``/pooling``, ``/score`` and ``/rerank``: pooling models served.

``/score`` and ``/rerank`` (vLLM's) score text pairs: with a cross-encoder
(BertForSequenceClassification) each pair is one prompt and the score its
activated logit; with an embedding model, the cosine of the two embeddings.

Each input becomes one engine request with `PoolingParams`; the response
carries the vectors as JSON floats or, with ``encoding_format: "base64"``,
as base64 of little-endian float32 bytes (what the official ``openai`` client
asks for by default and decodes). The endpoints are registered on every
server; on a generation model they answer 400 naming the model kind, and the
generation endpoints answer 400 on a pooling model (`require_runner`).
"""

from __future__ import annotations

import base64
import logging

import numpy as np
from fastapi import Request

from backplane.core.pooling.pooler import encode_pair
from backplane.entrypoints.openai.errors import (
    bad_request,
)
from backplane.entrypoints.openai.protocol import UsageInfo, now, random_id
from backplane.entrypoints.openai.protocol_pooling import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from backplane.entrypoints.openai.serving_common import (
    ServingContext,
    add_requests,
    display_id,
    finals_unless_disconnected,
    iterate_request,
)
from backplane.pooling_params import PoolingParams

logger = logging.getLogger(__name__)


def runner_type(ctx: ServingContext) -> str:
    """``"generate"`` or ``"pooling"``: what the served model runs as."""
    return getattr(getattr(ctx.engine, "engine", None), "runner_type", "generate")


def require_runner(ctx: ServingContext, wanted: str, endpoint: str) -> None:
    """400 when ``endpoint`` needs a ``wanted`` model and the served one is the other kind."""
    kind = runner_type(ctx)
    if kind == wanted:
        return
    if kind == "pooling":
        raise bad_request(
            f"{endpoint} needs a generation model, but model {ctx.model_name!r} is served as "
            "a pooling (embedding) model (--runner pooling); use /v1/embeddings or /pooling",
            "model",
        )
    raise bad_request(
        f"{endpoint} needs a pooling (embedding) model, but model {ctx.model_name!r} is "
        "served as a generation model (--runner generate); serve an embedding model or "
        "start the server with --runner pooling",
        "model",
    )


def encode_vector(values, encoding_format: str) -> list[float] | str:
    array = np.asarray(values, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(array.tobytes()).decode("ascii")
    return array.tolist()


class PoolingServing:
    """Handlers of /v1/embeddings and /pooling."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def _prompts(self, req: EmbeddingRequest) -> list[list[int]]:
        ctx = self.ctx
        value = req.input
        if isinstance(value, str):
            items: list = [value]
        elif value and all(isinstance(t, int) for t in value):
            items = [list(value)]
        else:
            items = list(value)
        if not items:
            raise bad_request("input is empty: give at least one text or token list", "input")
        if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens == 0:
            raise bad_request("truncate_prompt_tokens must be -1 or >= 1", "truncate_prompt_tokens")
        keep = req.truncate_prompt_tokens
        if keep == -1:
            keep = ctx.max_model_len
        prompts = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise bad_request("input contains an empty string", "input")
                ids = await ctx.prompts.tokenize(item, "input",
                                                 add_special_tokens=req.add_special_tokens,
                                                 truncate_to=keep)
            else:
                if not item:
                    raise bad_request("input contains an empty token list", "input")
                ctx.check_token_ids(item, "input")
                ids = item[-keep:] if keep else item
            if len(ids) > ctx.max_model_len:
                raise bad_request(
                    f"input has {len(ids)} tokens, more than max_model_len "
                    f"({ctx.max_model_len}); shorten it or set truncate_prompt_tokens", "input")
            prompts.append(ids)
        return prompts

    async def _run(self, req: EmbeddingRequest, raw_request: Request, task: str,
                   endpoint: str):
        ctx = self.ctx
        ctx.check_base_model(req.model, endpoint)
        require_runner(ctx, "pooling", endpoint)
        prompts = await self._prompts(req)
        params = PoolingParams(task=task, dimensions=req.dimensions, normalize=req.normalize)
        outputs = await self._submit(prompts, params, display_id(req, raw_request) or
                                     random_id("embd"), raw_request)
        return outputs, prompts

    async def _submit(self, prompts: list, params: PoolingParams, base_id: str,
                      raw_request: Request):
        """Queue one engine request per prompt; their final outputs (None: client left)."""
        ctx = self.ctx
        request_ids = ctx.engine_request_ids(base_id, len(prompts))
        streams = await add_requests(ctx, request_ids, prompts, [params] * len(prompts))
        iterators = [iterate_request(ctx.engine, stream) for stream in streams]
        return await finals_unless_disconnected(ctx, raw_request, request_ids, iterators)

    @staticmethod
    def _usage(prompts: list[list[int]]) -> UsageInfo:
        n = sum(len(p) for p in prompts)
        return UsageInfo(prompt_tokens=n, completion_tokens=0, total_tokens=n)

    async def embeddings(self, req: EmbeddingRequest, raw_request: Request):
        outputs, prompts = await self._run(req, raw_request, "embed", "/v1/embeddings")
        if outputs is None:
            return None
        data = [EmbeddingData(index=i, embedding=encode_vector(o.outputs.data,
                                                               req.encoding_format))
                for i, o in enumerate(outputs)]
        return EmbeddingResponse(id=random_id("embd"), created=now(),
                                 model=self.ctx.model_name, data=data,
                                 usage=self._usage(prompts))

    async def pooling(self, req: PoolingRequest, raw_request: Request):
        outputs, prompts = await self._run(req, raw_request, "encode", "/pooling")
        if outputs is None:
            return None
        data = [PoolingData(index=i, data=encode_vector(o.outputs.data, req.encoding_format))
                for i, o in enumerate(outputs)]
        return PoolingResponse(id=random_id("pool"), created=now(),
                               model=self.ctx.model_name, data=data,
                               usage=self._usage(prompts))

    # ------------------------------------------------------------ /score, /rerank
    async def _scores(self, first: list[str], second: list[str], endpoint: str, field: str,
                      raw_request: Request, base_id: str):
        """(scores, prompt tokens) of each (first[i], second[i]); None when the client left.

        A cross-encoder reads each pair as one prompt (``[CLS] a [SEP] b [SEP]``) and
        scores it with its activated logit; an embedding model scores by the cosine
        similarity of the two normalised embeddings (vLLM's scoring of both).
        """
        ctx = self.ctx
        require_runner(ctx, "pooling", endpoint)
        for texts in (first, second):
            if any(not isinstance(t, str) or not t for t in texts):
                raise bad_request(f"{endpoint}: every text must be a non-empty string", field)
        engine = getattr(ctx.engine, "engine", None)
        if getattr(engine, "is_cross_encoder", False):
            try:
                prompts = [encode_pair(ctx.engine.tokenizer, a, b, ctx.max_model_len)
                           for a, b in zip(first, second, strict=True)]
            except ValueError as exc:
                raise bad_request(str(exc), field) from None
            outputs = await self._submit(prompts, PoolingParams(task="score"), base_id,
                                         raw_request)
            if outputs is None:
                return None
            tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
            return [float(o.outputs.data[0]) for o in outputs], tokens
        unique = list(dict.fromkeys(first + second))
        prompts = []
        for text in unique:
            ids = await ctx.prompts.tokenize(text, field)
            if len(ids) > ctx.max_model_len:
                raise bad_request(f"a text has {len(ids)} tokens, more than max_model_len "
                                  f"({ctx.max_model_len})", field)
            prompts.append(ids)
        outputs = await self._submit(prompts, PoolingParams(task="embed", normalize=True),
                                     base_id, raw_request)
        if outputs is None:
            return None
        vectors = {t: o.outputs.data for t, o in zip(unique, outputs, strict=True)}
        scores = [float((vectors[a] * vectors[b]).sum()) for a, b in zip(first, second,
                                                                          strict=True)]
        return scores, sum(len(p) for p in prompts)

    async def score(self, req: ScoreRequest, raw_request: Request):
        ctx = self.ctx
        ctx.check_base_model(req.model, "/score")
        require_runner(ctx, "pooling", "/score")
        first = [req.text_1] if isinstance(req.text_1, str) else list(req.text_1)
        second = [req.text_2] if isinstance(req.text_2, str) else list(req.text_2)
        if not first or not second:
            raise bad_request("text_1 and text_2 need at least one text each", "text_1")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise bad_request(f"text_1 has {len(first)} texts and text_2 {len(second)}: give "
                              "one text_1 or as many as text_2", "text_2")
        result = await self._scores(first, second, "/score", "text_2", raw_request,
                                    display_id(req, raw_request) or random_id("score"))
        if result is None:
            return None
        scores, tokens = result
        return ScoreResponse(
            id=random_id("score"), created=now(), model=ctx.model_name,
            data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
            usage=UsageInfo(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens))

    async def rerank(self, req: RerankRequest, raw_request: Request):
        ctx = self.ctx
        ctx.check_base_model(req.model, "/rerank")
        require_runner(ctx, "pooling", "/rerank")
        if not req.documents:
            raise bad_request("documents is empty: give at least one document", "documents")
        if not req.query:
            raise bad_request("query is empty", "query")
        result = await self._scores([req.query] * len(req.documents), list(req.documents),
                                    "/rerank", "documents", raw_request,
                                    display_id(req, raw_request) or random_id("rerank"))
        if result is None:
            return None
        scores, tokens = result
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if req.top_n:
            order = order[: req.top_n]
        results = [RerankResult(index=i, document=RerankDocument(text=req.documents[i]),
                                relevance_score=scores[i]) for i in order]
        return RerankResponse(id=random_id("rerank"), model=ctx.model_name,
                              usage=RerankUsage(total_tokens=tokens), results=results)
