"""`backplane serve [MODEL]`: the OpenAI-compatible HTTP server.

Every engine flag of `backplane.config.cli_args` is accepted (vLLM's
spellings), plus the server's own, declared once in
`backplane.config.server_options` (--host, --port, --api-key, --max-n,
--max-request-body-bytes, --allowed-origins, ...). ``--config FILE.yaml`` may
hold both kinds (keys are flag names); flags override the file. Without
MODEL (and no ``model:`` in the file or BACKPLANE_MODEL) the bundled demo
model is served.

Shutdown: on SIGINT/SIGTERM the server stops accepting connections and lets
requests in flight finish for ``--graceful-shutdown-timeout`` seconds; then
every one still running gets a final error (an SSE error event and
``[DONE]`` for streams) and the process exits 0. If the engine loop dies, the
server shuts down and exits 1, so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from backplane.config.server_options import (
    SERVER_OPTION_KEYS,
    ServerOptions,
    add_server_args,
)

logger = logging.getLogger("backplane.serve")

# Exit status when the engine loop died (a supervisor should restart the server).
EXIT_ENGINE_DEAD = 1


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


def resolve_server_options(args: argparse.Namespace) -> ServerOptions:
    """Server options from defaults < config file < environment (API key) < flags."""
    from backplane.config.server_options import resolve_server_options as resolve
    from backplane.config.sources import CONFIG_ENV_VAR, load_yaml_config

    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV_VAR)
    from_file = load_yaml_config(path) if path else None
    return resolve(args, from_file, where=f"config file {path!r}")


def load_chat_template(value: str | None) -> str | None:
    """A template given as a file path is read; anything else is the template itself."""
    if value and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def build_engine_args(args: argparse.Namespace):
    """EngineArgs from flags, config file and environment; demo model if none is named."""
    from backplane.config.sources import engine_args_from_sources

    extra = SERVER_OPTION_KEYS
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
        name = getattr(demo, "DEMO_MODEL_NAME", None)
        engine_args.served_model_name = [name] if name else None
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
    engine_box: list = []
    try:
        code = _serve(args, engine_box)
    except (KeyboardInterrupt, _Terminated):
        logger.info("server stopped")
        code = 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"backplane serve: error: {exc}", file=sys.stderr)
        code = 2
    return _exit_code(engine_box, code)


def _exit_code(engine_box: list, code: int) -> int:
    """The status to exit with; leaves at once if the engine thread is still busy.

    A loop thread stuck in a long step (a first compile, say) must not hold up
    the exit, and letting the interpreter finalize under a thread that is inside
    native code can abort the process; so after logging, leave with os._exit.
    """
    engine = engine_box[0] if engine_box else None
    if engine is not None and engine.errored:
        code = EXIT_ENGINE_DEAD
    loop_thread = getattr(engine, "_thread", None)
    if loop_thread is not None and loop_thread.is_alive():
        logger.warning("engine loop still busy at exit; leaving without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _serve(args: argparse.Namespace, engine_box: list) -> int:
    from backplane.core.engine.async_engine import AsyncEngine
    from backplane.entrypoints.openai.api_server import build_app
    from backplane.entrypoints.openai.http_server import DrainingServer

    server_opts = resolve_server_options(args)
    engine_args = build_engine_args(args)
    if server_opts.lora_modules and not engine_args.enable_lora:
        # Refused before the model is loaded (build_app checks again, for embedders).
        raise ValueError("--lora-modules needs --enable-lora: without it the engine serves no "
                         "adapters")
    chat_template = load_chat_template(server_opts.chat_template)
    engine = AsyncEngine.from_engine_args(engine_args)
    engine_box.append(engine)
    try:
        log_startup(engine, server_opts)
        app = build_app(engine, options=server_opts, chat_template=chat_template)
        config = uvicorn_config(app, server_opts)
        server = DrainingServer(config, engine, server_opts.graceful_shutdown_timeout)
        engine.add_dead_callback(server.engine_died)
        server.run()
        # lifespan shutdown stops the engine; a failed start-up (port in use) does not reach it
        if engine.errored:
            logger.error("the engine loop died; exiting with status %d", EXIT_ENGINE_DEAD)
            return EXIT_ENGINE_DEAD
        return 0 if server.started else 1
    finally:
        engine.shutdown(timeout=server_opts.graceful_shutdown_timeout)


def uvicorn_config(app, opts: ServerOptions):
    """The uvicorn configuration of ``opts`` (bind address, TLS, HTTP limits, shutdown)."""
    import uvicorn

    from backplane.entrypoints.openai.http_server import HeaderTimeoutH11Protocol

    return uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level=opts.uvicorn_log_level,
        root_path=opts.root_path,
        # The drain (DrainingServer) ends every request at the grace period;
        # uvicorn's own cut-off is a backstop a little later.
        timeout_graceful_shutdown=opts.graceful_shutdown_timeout + 5,
        timeout_keep_alive=opts.timeout_keep_alive,
        limit_concurrency=opts.limit_concurrency,
        ssl_keyfile=opts.ssl_keyfile,
        ssl_certfile=opts.ssl_certfile,
        http=HeaderTimeoutH11Protocol.with_timeout(opts.header_timeout),
    )


def log_startup(engine, opts: ServerOptions) -> None:
    """Log the model, dtype, KV cache size and the URL (the engine logged the platform)."""
    cfg = engine.config
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
