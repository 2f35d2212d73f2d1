"""`backplane serve [MODEL]`: the OpenAI-compatible HTTP server.

Every engine flag of `backplane.config.cli_args` is accepted (vLLM's
spellings), plus the server's own: --host, --port, --api-key,
--chat-template, --uvicorn-log-level, --root-path,
--graceful-shutdown-timeout. ``--config FILE.yaml`` may hold both kinds
(keys are flag names); flags override the file. Without MODEL (and no
``model:`` in the file or BACKPLANE_MODEL) the bundled demo model is served.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("backplane.serve")

# Server options, their defaults, and their types (YAML values are converted with these).
SERVER_DEFAULTS: dict[str, Any] = {
    "host": "0.0.0.0",
    "port": 8000,
    "api_key": None,
    "chat_template": None,
    "uvicorn_log_level": "info",
    "root_path": "",
    "graceful_shutdown_timeout": 10.0,
}
_SERVER_TYPES = {"port": int, "graceful_shutdown_timeout": float}


@dataclass
class ServerOptions:
    """Resolved server (not engine) options."""

    host: str
    port: int
    api_key: str | None
    chat_template: str | None
    uvicorn_log_level: str
    root_path: str
    graceful_shutdown_timeout: float


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    from backplane.config.cli_args import add_engine_args

    parser = subparsers.add_parser(
        "serve",
        help="start the OpenAI-compatible server",
        description=(
            "Serve MODEL (a Hugging Face model directory) over the OpenAI API. Without MODEL "
            "the small demo model bundled with Backplane is served."
        ),
    )
    add_engine_args(parser, positional_model=True)
    add_server_args(parser)
    parser.set_defaults(func=run)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The server's own flags (defaults SUPPRESS so a config file can set them)."""
    group = parser.add_argument_group("server")
    sup = argparse.SUPPRESS
    group.add_argument("--host", default=sup, help="address to bind [default: 0.0.0.0]")
    group.add_argument("--port", type=int, default=sup, help="port to bind [default: 8000]")
    group.add_argument(
        "--api-key",
        dest="api_key",
        default=sup,
        help="require 'Authorization: Bearer KEY' on the API routes (also BACKPLANE_API_KEY)",
    )
    group.add_argument(
        "--chat-template",
        dest="chat_template",
        default=sup,
        metavar="FILE_OR_TEMPLATE",
        help="Jinja chat template (a file path or the template itself) overriding the tokenizer's",
    )
    group.add_argument(
        "--uvicorn-log-level",
        dest="uvicorn_log_level",
        default=sup,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level [default: info]",
    )
    group.add_argument(
        "--root-path", dest="root_path", default=sup, help="ASGI root_path behind a proxy"
    )
    group.add_argument(
        "--graceful-shutdown-timeout",
        dest="graceful_shutdown_timeout",
        type=float,
        default=sup,
        help="seconds in-flight requests may take to finish after SIGINT/SIGTERM before they "
        "are aborted [default: 10]",
    )


def resolve_server_options(args: argparse.Namespace) -> ServerOptions:
    """Server options from defaults < config file < environment (API key) < flags."""
    from backplane.config.sources import CONFIG_ENV_VAR, load_yaml_config

    values = dict(SERVER_DEFAULTS)
    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV_VAR)
    if path:
        from_file = load_yaml_config(path)
        for key in SERVER_DEFAULTS:
            if key in from_file and from_file[key] is not None:
                convert = _SERVER_TYPES.get(key, str)
                try:
                    values[key] = convert(from_file[key])
                except (TypeError, ValueError):
                    raise ValueError(
                        f"config file {path!r}: {key} must be {convert.__name__}, "
                        f"got {from_file[key]!r}"
                    ) from None
    if os.environ.get("BACKPLANE_API_KEY"):
        values["api_key"] = os.environ["BACKPLANE_API_KEY"]
    for key in SERVER_DEFAULTS:
        if hasattr(args, key):
            values[key] = getattr(args, key)
    if not 0 <= int(values["port"]) <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {values['port']}")
    return ServerOptions(**values)


def load_chat_template(value: str | None) -> str | None:
    """A template given as a file path is read; anything else is the template itself."""
    if value and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def build_engine_args(args: argparse.Namespace):
    """EngineArgs from flags, config file and environment; demo model if none is named."""
    from backplane.config.options import SERVER_OPTION_KEYS
    from backplane.config.sources import engine_args_from_sources

    extra = SERVER_OPTION_KEYS | set(SERVER_DEFAULTS)
    try:
        return engine_args_from_sources(cli=args, extra_keys=extra)
    except ValueError as exc:
        if "model is required" not in str(exc):
            raise
    path = demo_model_path()
    logger.info("no model given: serving the bundled demo model at %s", path)
    engine_args = engine_args_from_sources(cli=args, kwargs={"model": path}, extra_keys=extra)
    if engine_args.served_model_name is None:
        demo = importlib.import_module("backplane.demo_model")
        engine_args.served_model_name = getattr(demo, "DEMO_MODEL_NAME", None)
    return engine_args


def demo_model_path() -> str:
    """The bundled demo model's directory (built on first use by `backplane.demo_model`)."""
    try:
        from backplane.demo_model import default_model_path
    except ImportError as exc:
        raise RuntimeError(
            f"no model given and the bundled demo model is unavailable ({exc}); pass MODEL"
        ) from None
    return str(default_model_path())


class _Terminated(Exception):
    """SIGTERM arrived; unwinds like KeyboardInterrupt does for SIGINT."""


def _raise_terminated(_signum, _frame) -> None:
    raise _Terminated()


def run(args: argparse.Namespace) -> int:
    """Build the engine, log what was chosen, and serve until SIGINT/SIGTERM."""
    # uvicorn re-raises the signal it caught once it has shut down gracefully; with
    # this handler (and KeyboardInterrupt for SIGINT) that ends in a clean exit 0.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _serve(args)
    except (KeyboardInterrupt, _Terminated):
        logger.info("server stopped")
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"backplane serve: error: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backplane.core.engine.async_engine import AsyncEngine
    from backplane.entrypoints.openai.api_server import build_app

    server_opts = resolve_server_options(args)
    engine_args = build_engine_args(args)
    chat_template = load_chat_template(server_opts.chat_template)
    engine = AsyncEngine.from_engine_args(engine_args)
    try:
        log_startup(engine, server_opts)
        app = build_app(engine, api_key=server_opts.api_key, chat_template=chat_template)
        config = uvicorn.Config(
            app,
            host=server_opts.host,
            port=server_opts.port,
            log_level=server_opts.uvicorn_log_level,
            root_path=server_opts.root_path,
            timeout_graceful_shutdown=server_opts.graceful_shutdown_timeout,
            timeout_keep_alive=5,
        )
        server = uvicorn.Server(config)
        server.run()
        # lifespan shutdown stops the engine; a failed start-up (port in use) does not reach it
        return 0 if server.started else 1
    finally:
        engine.shutdown()


def log_startup(engine, opts: ServerOptions) -> None:
    """Log the platform and why, the model, dtype, KV cache size and the URL."""
    from backplane.platforms import selection_report

    cfg = engine.config
    report = selection_report(cfg.device_config.device)
    if report is not None:
        logger.info("%s", report.summary())
    else:
        logger.info("platform %s", getattr(engine.platform, "name", "?"))
    mc = cfg.model_config
    logger.info(
        "model %s (served as %r), dtype %s, max_model_len %d",
        mc.model,
        mc.name,
        str(mc.torch_dtype).removeprefix("torch."),
        cfg.max_model_len,
    )
    stats = engine.get_stats()
    if stats is not None:
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens; prefix caching %s",
            stats.num_total_blocks,
            stats.block_size,
            stats.num_total_blocks * stats.block_size,
            "on" if cfg.cache_config.enable_prefix_caching else "off",
        )
    host = opts.host if opts.host not in ("0.0.0.0", "::", "") else "localhost"
    logger.info(
        "serving the OpenAI API at http://%s:%d/v1 (bound to %s)%s",
        host,
        opts.port,
        opts.host,
        "; API key required" if opts.api_key else "",
    )
