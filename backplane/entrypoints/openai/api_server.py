"""The OpenAI-compatible HTTP server: FastAPI app over an AsyncEngine, run by uvicorn.

Routes:
    GET  /v1/models               served model names
    GET  /v1/models/{model_id}    one served model's card (404 if not served)
    POST /v1/completions          text completions (JSON or SSE)
    POST /v1/chat/completions     chat completions (JSON or SSE)
    POST /v1/responses            OpenAI Responses API, text only (JSON or typed SSE events)
    POST /tokenize, /detokenize   the model's tokenizer
    GET  /health                  200 while the engine loop runs, 503 otherwise
    GET  /ping, POST /ping        the same as /health (vLLM / SageMaker liveness probe)
    GET  /version                 Backplane's version
    GET  /metrics                 Prometheus text (``backplane:*``)
    GET  /server_info             resolved config and platform; only with
                                  BACKPLANE_SERVER_DEV_MODE=1
With an API key, every route except /health, /ping, /version and /metrics needs
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from backplane.core.engine.async_engine import AsyncEngine
from backplane.entrypoints.openai.auth import APIKeyMiddleware
from backplane.entrypoints.openai.errors import engine_dead, error_response, install_error_handlers
from backplane.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from backplane.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from backplane.entrypoints.openai.protocol_responses import ResponsesRequest
from backplane.entrypoints.openai.serving_chat import ChatServing
from backplane.entrypoints.openai.serving_common import ServingContext
from backplane.entrypoints.openai.serving_completion import CompletionServing
from backplane.entrypoints.openai.serving_responses import ResponsesServing
from backplane.entrypoints.openai.serving_tokenization import TokenizationServing
from backplane.version import __version__

logger = logging.getLogger(__name__)

DEV_MODE_ENV = "BACKPLANE_SERVER_DEV_MODE"


def build_app(
    engine: AsyncEngine,
    *,
    served_model_names: list[str] | None = None,
    api_key: str | None = None,
    chat_template: str | None = None,
    shutdown_engine_on_exit: bool = True,
    dev_mode: bool | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine``.

    Args:
        engine: a started AsyncEngine.
        served_model_names: names clients may pass as ``model``; the first is
            reported in responses. Defaults to the config's served name or path.
        api_key: require this bearer token (None: no auth).
        chat_template: Jinja chat template overriding the tokenizer's.
        shutdown_engine_on_exit: shut the engine down when the app's lifespan ends.
        dev_mode: expose /server_info; None reads BACKPLANE_SERVER_DEV_MODE.
    """
    names = served_model_names or [engine.config.model_config.name]
    metrics = ServerMetrics(engine, names[0])
    ctx = ServingContext(engine, list(names), metrics, chat_template)
    completions, chats, tokens = CompletionServing(ctx), ChatServing(ctx), TokenizationServing(ctx)
    responses = ResponsesServing(ctx)
    if dev_mode is None:
        dev_mode = os.environ.get(DEV_MODE_ENV, "0") == "1"

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if shutdown_engine_on_exit:
            logger.info("shutting down the engine")
            engine.shutdown()

    app = FastAPI(
        title="Backplane OpenAI-compatible server", version=__version__, lifespan=lifespan
    )
    app.state.serving = ctx
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    @app.api_route("/ping", methods=["GET", "POST"])  # vLLM's (SageMaker's) name for /health
    async def health() -> Response:
        try:
            engine.check_health()
        except Exception as exc:
            return error_response(engine_dead(exc))
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> ModelCard:
        root = engine.config.model_config.model
        return ModelCard(id=name, root=root, max_model_len=ctx.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card(n) for n in names])

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> ModelCard:
        ctx.check_model(model_id)  # 404 model_not_found otherwise
        return model_card(model_id)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw_request: Request):
        return await completions.create(body, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request):
        return await chats.create(body, raw_request)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, raw_request: Request):
        return await responses.create(body, raw_request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return tokens.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return tokens.detokenize(body)

    if dev_mode:

        @app.get("/server_info")
        async def server_info() -> JSONResponse:
            return JSONResponse(server_info_dict(engine))

    return app


def server_info_dict(engine: AsyncEngine) -> dict[str, Any]:
    """The resolved engine config and platform, as JSON-safe data."""
    config = engine.config
    sections = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        sections[f.name] = _jsonable(value)
    platform = engine.platform
    stats = engine.get_stats()
    return {
        "version": __version__,
        "platform": {
            "name": getattr(platform, "name", None),
            "device_type": getattr(platform, "device_type", None),
        },
        "config": sections,
        "stats": _jsonable(stats),
    }


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != "hf_config"
        }
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
