"""The app factory: ``create_app(settings)`` wires config, routers, handlers and tasks."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from chatmaild.config import Config, read_config

from .metrics import make_registry
from .routes import account_creation, accounts, dns, health, metrics, new, probe, queue, status
from .runtime import Runtime
from .settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, config: Config | None = None) -> FastAPI:
    """Build the app; ``config`` defaults to reading ``settings.chatmail_ini``."""
    config = config if config is not None else read_config(settings.chatmail_ini)
    runtime = Runtime(settings, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="chatmail relay control API",
        version="1",
        description="Status, DNS, account creation, accounts, queue, metrics and probes of one "
        "chatmail relay.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.registry = make_registry(runtime)
    for module in (health, status, dns, account_creation, accounts, queue, metrics, probe, new):
        app.include_router(module.router)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()))
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the API's journal"}, 500)

    return app
