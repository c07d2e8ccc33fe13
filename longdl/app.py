"""Builds the ``web.Application``: resources opened in order in ``cleanup_ctx``, closed in
reverse, reached through the typed keys of :mod:`longdl.web.keys`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

from aiohttp import web

from longdl import exceptions, webhooks
from longdl import handlers as builtin_handlers
from longdl import storage as storage_backends
from longdl import store as stores
from longdl.config import Settings, check_replica_secrets
from longdl.engine import Engine, Handler, new_worker_id
from longdl.web import (
    events,
    files,
    keys,
    metrics,
    openapi,
    pipeline,
    policy,
    render,
    routes,
    ui,
)

log = logging.getLogger("longdl")

#: How long start-up waits for a database it cannot reach (a replica started while
#: PostgreSQL restarts, or before it is up), trying again with growing pauses.
STORE_OPEN_WAIT_S = 60.0


async def open_when_reachable(store: stores.Store, wait_s: float = STORE_OPEN_WAIT_S) -> None:
    """Open ``store``, waiting up to ``wait_s`` for a database that is away.

    Raises:
        exceptions.StoreUnavailable: still away after ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    pause_s = 0.25
    while True:
        try:
            await store.open()
            return
        except exceptions.StoreUnavailable as exc:
            if time.monotonic() + pause_s > deadline:
                raise
            log.warning("store.unavailable at start-up: %s; trying again in %.2g s", exc, pause_s)
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, 5.0)


def create_app(
    settings: Settings | None = None,
    *,
    handlers: Mapping[str, Handler] | None = None,
    storage: storage_backends.Storage | None = None,
) -> web.Application:
    """The longdl application.

    Args:
        settings: configuration; read from the environment when omitted.
        handlers: extra job kinds besides the built-in ``download``.
        storage: a storage backend to use instead of the configured one (already built,
            opened and closed by the app).
    """
    settings = settings or Settings()
    app = web.Application(
        # Outermost first: every later layer sees a request id and the caller; metrics
        # time what the client gets, problems included; auth and limits raise problems.
        # One layer (web/pipeline.py): request id and caller, metrics, CORS preflights,
        # problems, the deadline, auth and rate limits, in that order.
        middlewares=[pipeline.pipeline],
        client_max_size=settings.max_body_bytes,
    )
    app[keys.SETTINGS] = settings
    policy.install(app, settings)
    render.install(app, settings.signed_url_ttl_s)
    pipeline.install(app)
    metrics.install(app)
    all_handlers = {**builtin_handlers.builtin(), **(handlers or {})}

    worker_id = new_worker_id()
    app[keys.WORKER_ID] = worker_id

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        check_replica_secrets(settings)
        store = stores.from_settings(settings, worker_id)
        await open_when_reachable(store)
        app[keys.STORE] = store
        yield
        await store.close()

    async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
        backend = storage or storage_backends.from_settings(settings)
        await backend.open()
        app[keys.STORAGE] = backend
        yield
        await backend.close()

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        engine = Engine(
            app[keys.STORE], app[keys.STORAGE], all_handlers, settings, worker_id=worker_id
        )
        engine.hub.add_listener(app[metrics.METRICS].on_job_change)
        await engine.start()
        app[keys.ENGINE] = engine
        where = (
            settings.storage_summary()
            if storage is None
            else f"storage={app[keys.STORAGE].name} (passed to create_app)"
        )
        log.info(
            "longdl ready store=%s %s data_dir=%s workers=%d worker_id=%s",
            app[keys.STORE].name,
            where,
            settings.data_dir.resolve(),
            settings.worker_concurrency,
            worker_id,
        )
        if settings.ignored_s3_variables and storage is None:
            log.warning(
                "STORAGE_BACKEND=local: ignoring %s", ", ".join(settings.ignored_s3_variables)
            )
        yield
        # The grace started at drain: jobs ran on while aiohttp waited for open requests.
        drained_at = shutdown_started.get("at")
        spent_s = 0.0 if drained_at is None else time.monotonic() - drained_at
        await engine.stop(grace_s=max(0.0, settings.shutdown_grace_s - spent_s))

    shutdown_started: dict[str, float] = {}

    async def drain(app: web.Application) -> None:
        # on_shutdown runs as soon as the server stops listening, before aiohttp waits
        # for open requests: waiters answer now and new jobs get 503.
        shutdown_started["at"] = time.monotonic()
        if keys.ENGINE in app:
            app[keys.ENGINE].drain()

    app.cleanup_ctx.extend([store_ctx, storage_ctx, engine_ctx])
    app.on_shutdown.append(drain)
    app.cleanup_ctx.append(webhooks.worker_ctx)
    routes.install(app)
    app.router.add_routes(files.routes)
    events.setup(app)
    app.router.add_routes(ui.routes)
    openapi.install(app)
    return app
