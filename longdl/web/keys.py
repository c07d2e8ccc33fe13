"""Typed application keys: how handlers reach the resources ``app.py`` opened."""

from __future__ import annotations

from aiohttp import web

from longdl.config import Settings
from longdl.engine import Engine
from longdl.storage import Storage
from longdl.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
STORAGE = web.AppKey("storage", Storage)
ENGINE = web.AppKey("engine", Engine)
#: This process's worker id: the replica's name in logs, metrics and leases.
WORKER_ID = web.AppKey("worker_id", str)

#: Per-request values set by middlewares.
REQUEST_ID = web.RequestKey("request_id", str)
#: Owner scope of the caller's jobs: the API key's name, or "" when the service is open.
CALLER = web.RequestKey("caller", str)
#: Who is calling, for limits: the API key's name, else the client address.
CLIENT = web.RequestKey("client", str)
