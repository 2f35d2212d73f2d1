"""The OpenAI-compatible HTTP server: FastAPI app over an AsyncEngine, run by uvicorn.

Routes:
    GET  /v1/models               served model names, then the LoRA adapters (``parent``:
                                  their base model, ``root``: their path)
    GET  /v1/models/{model_id}    one served model's or adapter's card (404 if not served)
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
    POST /reset_prefix_cache      drop every cached prefix block; dev mode only
    POST /v1/load_lora_adapter    serve a LoRA adapter ({"lora_name", "lora_path"}); only
                                  with --allow-runtime-lora-updating
    POST /v1/unload_lora_adapter  stop serving one ({"lora_name"}); the same
With an API key, every route except /health, /ping, /version and /metrics needs
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import logging
import os
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from backplane.config.server_options import ServerOptions, parse_lora_modules
from backplane.core.engine.async_engine import AsyncEngine
from backplane.entrypoints.openai.auth import APIKeyMiddleware, RequestIdHeaderMiddleware
from backplane.entrypoints.openai.errors import engine_dead, error_response, install_error_handlers
from backplane.entrypoints.openai.http_server import BodySizeLimitMiddleware
from backplane.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from backplane.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from backplane.entrypoints.openai.protocol_pooling import (
    EmbeddingRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
)
from backplane.entrypoints.openai.protocol_responses import ResponsesRequest
from backplane.entrypoints.openai.serving_chat import ChatServing
from backplane.entrypoints.openai.serving_common import ServerLimits, ServingContext
from backplane.entrypoints.openai.serving_completion import CompletionServing
from backplane.entrypoints.openai.serving_lora import (
    LoadLoRAAdapterRequest,
    LoRAAdapters,
    UnloadLoRAAdapterRequest,
)
from backplane.entrypoints.openai.serving_pooling import PoolingServing, require_runner
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
    options: ServerOptions | None = None,
    shutdown_engine_on_exit: bool = True,
    dev_mode: bool | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine``.

    Args:
        engine: a started AsyncEngine.
        served_model_names: names clients may pass as ``model``; the first is
            reported in responses. Defaults to the config's served names or path.
        api_key: require this bearer token (None: the options' key, or no auth).
        chat_template: Jinja chat template overriding the tokenizer's.
        options: the server options (limits, CORS, middleware, logging...);
            defaults to ServerOptions().
        shutdown_engine_on_exit: shut the engine down when the app's lifespan ends.
        dev_mode: expose /server_info and /reset_prefix_cache; None reads
            BACKPLANE_SERVER_DEV_MODE.

    Raises ValueError for ``--lora-modules`` the engine cannot serve (the message
    names the adapter), or given without ``--enable-lora``.
    """
    opts = options or ServerOptions()
    api_key = api_key or opts.api_key
    names = served_model_names or engine.config.model_config.served_names
    loras = LoRAAdapters(engine, list(names))
    loras.add_startup(parse_lora_modules(opts.lora_modules))
    if opts.allow_runtime_lora_updating:
        logger.warning("runtime LoRA updating is on: clients may load adapters from any path "
                       "the server can read (/v1/load_lora_adapter)")
    metrics = ServerMetrics(engine, names[0])
    ctx = ServingContext(
        engine, list(names), metrics, chat_template, limits=ServerLimits.from_options(opts),
        loras=loras,
    )
    completions, chats, tokens = CompletionServing(ctx), ChatServing(ctx), TokenizationServing(ctx)
    responses = ResponsesServing(ctx)
    pooling = PoolingServing(ctx)
    if dev_mode is None:
        dev_mode = os.environ.get(DEV_MODE_ENV, "0") == "1"

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        stats_task = None if opts.disable_log_stats else asyncio.create_task(log_stats(engine))
        yield
        if stats_task is not None:
            stats_task.cancel()
        ctx.prompts.close()
        if shutdown_engine_on_exit:
            logger.info("shutting down the engine")
            engine.shutdown(timeout=opts.graceful_shutdown_timeout)

    docs = {} if not opts.disable_fastapi_docs else dict(
        docs_url=None, redoc_url=None, openapi_url=None
    )
    app = FastAPI(
        title="Backplane OpenAI-compatible server", version=__version__, lifespan=lifespan,
        **docs,
    )
    app.state.serving = ctx
    install_error_handlers(app)
    install_middleware(app, opts, api_key)

    @app.get("/health")
    # vLLM's (SageMaker's) name for /health; one route per method, so that each
    # gets its own OpenAPI operation id.
    @app.get("/ping")
    @app.post("/ping")
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
        # The filesystem path would tell every client how the server is laid out.
        root = engine.config.model_config.model if opts.expose_model_path else names[0]
        return ModelCard(
            id=name, root=root, max_model_len=ctx.max_model_len,
            generation_defaults=ctx.sampling_defaults,
        )

    def adapter_card(lora) -> ModelCard:
        return ModelCard(
            id=lora.lora_name, root=lora.lora_path, parent=lora.base_model_name or names[0],
            max_model_len=ctx.max_model_len, generation_defaults=ctx.sampling_defaults,
        )

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        cards = [model_card(n) for n in names]
        return ModelList(data=cards + [adapter_card(a) for a in loras.all()])

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> ModelCard:
        lora = ctx.check_model(model_id)  # 404 model_not_found otherwise
        return model_card(model_id) if lora is None else adapter_card(lora)

    if opts.allow_runtime_lora_updating:
        # vLLM's routes and answers (200 with a plain-text line).
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            await loras.load(body.lora_name, body.lora_path)
            return PlainTextResponse(
                f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            await loras.unload(body.lora_name)
            return PlainTextResponse(
                f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw_request: Request):
        require_runner(ctx, "generate", "/v1/completions")
        return await completions.create(body, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request):
        require_runner(ctx, "generate", "/v1/chat/completions")
        return await chats.create(body, raw_request)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, raw_request: Request):
        require_runner(ctx, "generate", "/v1/responses")
        return await responses.create(body, raw_request)

    # Pooling models (--runner pooling); a generation model answers 400 here.
    # /score and /rerank: a cross-encoder's scores, or an embedding model's cosine.
    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest, raw_request: Request):
        return await pooling.embeddings(body, raw_request)

    @app.post("/pooling")
    async def create_pooling(body: PoolingRequest, raw_request: Request):
        return await pooling.pooling(body, raw_request)

    @app.post("/score")
    async def create_score(body: ScoreRequest, raw_request: Request):
        return await pooling.score(body, raw_request)

    @app.post("/rerank")
    async def create_rerank(body: RerankRequest, raw_request: Request):
        return await pooling.rerank(body, raw_request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await tokens.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return tokens.detokenize(body)

    if dev_mode:

        @app.get("/server_info")
        async def server_info() -> JSONResponse:
            return JSONResponse(server_info_dict(engine))

        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache() -> JSONResponse:
            reset = await engine.reset_prefix_cache()
            return JSONResponse({"reset": reset})

    return app


def install_middleware(app: FastAPI, opts: ServerOptions, api_key: str | None) -> None:
    """The middleware stack, outermost last: user middleware, CORS, API key, body limit.

    Starlette runs the last added first, so the body limit and the key are
    checked before any user middleware or route sees the request.
    """
    for path in opts.middleware:
        imported = import_attribute(path, "--middleware")
        if inspect.isclass(imported):
            app.add_middleware(imported)
        elif inspect.iscoroutinefunction(imported):
            app.middleware("http")(imported)
        else:
            raise ValueError(
                f"--middleware {path!r} is neither an ASGI middleware class nor an async "
                "function (request, call_next)"
            )
    if opts.enable_request_id_headers:
        app.add_middleware(RequestIdHeaderMiddleware)
    if opts.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=opts.allowed_origins,
            allow_methods=opts.allowed_methods,
            allow_headers=opts.allowed_headers,
            allow_credentials=opts.allow_credentials,
        )
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=opts.max_request_body_bytes)


def import_attribute(path: str, option: str):
    """``module.attr`` (or ``module:attr``) imported; ValueError naming ``option``."""
    module_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep:
        raise ValueError(f"{option} {path!r}: expected module.attribute")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{option} {path!r} cannot be imported: {exc}") from None


STATS_INTERVAL_S = 10.0


async def log_stats(engine: AsyncEngine, interval: float = STATS_INTERVAL_S) -> None:
    """Log load, KV cache usage and throughput every ``interval`` seconds (vLLM-style)."""
    last_tokens, last_time, was_idle = None, time.monotonic(), False
    while True:
        await asyncio.sleep(interval)
        stats = engine.get_stats()
        if stats is None:
            continue
        tokens = stats.num_generated_tokens
        now = time.monotonic()
        rate = 0.0 if last_tokens is None else (tokens - last_tokens) / (now - last_time)
        last_tokens, last_time = tokens, now
        idle = stats.num_running == 0 and stats.num_waiting == 0 and rate == 0
        if idle and was_idle:
            continue  # one line when the engine goes idle, then quiet until work arrives
        was_idle = idle
        spec = ""
        if stats.spec_decode is not None:
            per_position = stats.spec_decode["accepted_per_position"]
            drafts = max(stats.spec_decode["num_drafts"], 1)
            spec = (f", speculative acceptance {100 * stats.spec_acceptance_rate:.1f}%, mean "
                    f"accepted length {stats.spec_mean_accepted_length:.2f}, per position "
                    + "/".join(f"{a / drafts:.2f}" for a in per_position))
        logger.info(
            "engine: %d running, %d waiting, generation %.1f tokens/s, KV cache %.1f%% used, "
            "prefix cache hit rate %.1f%%%s",
            stats.num_running, stats.num_waiting, rate, 100 * stats.kv_cache_usage,
            100 * stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1), spec,
        )


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
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
