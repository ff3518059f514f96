"""Run the server: the engine behind the app, under uvicorn, until a signal or an engine failure."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from .app import create_app
from .config import ServerConfig
from .engine import create_engine

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(config: ServerConfig) -> int:
    """Serve until stopped. Returns the process exit code: 1 when the engine failed to start."""
    engine = create_engine(config)
    log.info("recallfix serve: model %s as %r, engine %s, patch %s", config.model, config.name, engine.name,
             config.patch or "none")
    log.info("A/B split %.2f to patched (NAME:ab), shadow rate %.2f, max concurrency %d, API key %s",
             config.ab_split, config.shadow_rate, config.max_concurrency, "required" if config.api_key else "off")
    if not config.api_key and not _is_loopback(config.host):
        log.warning("listening on %s without an API key: anyone who can reach it can load patches", config.host)
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_engine_failure(err: BaseException) -> None:
        failures.append(err)
        if server is not None:
            server.should_exit = True  # a server without an engine only answers 503: let it be replaced

    app = create_app(engine, config, on_engine_failure=on_engine_failure)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, access_log=config.access_log,
        timeout_graceful_shutdown=10,
    ))
    server.run()
    return 1 if failures else 0
