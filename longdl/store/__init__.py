"""The job store: the interface (:mod:`longdl.store.base`) and its backends.

- :mod:`longdl.store.sqlite`: one SQLite file in ``DATA_DIR`` (the default);
- :mod:`longdl.store.postgres`: PostgreSQL (``DATABASE_URL``), shared by replicas.

Each backend keeps its statements and numbered migrations under ``sql/<backend>/``.
"""

from __future__ import annotations

from longdl.config import Settings
from longdl.store.base import (
    ACTIVE_STATUSES,
    HELD_STATUSES,
    IDEMPOTENCY_TTL_S,
    WEBHOOKS_DUE,
    WORKER_LOST,
    AfterCommit,
    Claim,
    DeliveryStatus,
    Heartbeat,
    Inserted,
    Limits,
    NewJob,
    Rescued,
    Store,
    TrashItem,
    WebhookDelivery,
    WorkerInfo,
)
from longdl.store.sqlite import SQLiteStore


def from_settings(settings: Settings, worker_id: str = "longdl") -> Store:
    """The store the settings describe, not yet opened: PostgreSQL when DATABASE_URL
    is set, else SQLite in DATA_DIR.

    A write waits for another process's lock at most half of REQUEST_TIMEOUT_MS, so
    a request that cannot write answers 503 (nothing created) before its deadline cuts
    it off with a 504 (perhaps created).
    """
    busy_timeout_ms = settings.db_busy_timeout_ms
    if settings.request_timeout_ms:
        busy_timeout_ms = min(busy_timeout_ms, settings.request_timeout_ms // 2)
    if settings.database_url:
        # Imported here so SQLite deployments never load the driver.
        from longdl.store.postgres import PostgresStore

        return PostgresStore(
            settings.database_url,
            worker_id=worker_id,
            pool_size=settings.db_pool_size,
            stale_after_s=settings.lease_s,
            busy_timeout_ms=busy_timeout_ms,
        )
    return SQLiteStore(
        settings.database_path,
        synchronous=settings.db_synchronous,
        busy_timeout_ms=busy_timeout_ms,
    )


__all__ = [
    "ACTIVE_STATUSES",
    "HELD_STATUSES",
    "IDEMPOTENCY_TTL_S",
    "WEBHOOKS_DUE",
    "WORKER_LOST",
    "AfterCommit",
    "Claim",
    "DeliveryStatus",
    "Heartbeat",
    "Inserted",
    "Limits",
    "NewJob",
    "Rescued",
    "SQLiteStore",
    "Store",
    "TrashItem",
    "WebhookDelivery",
    "WorkerInfo",
    "from_settings",
]
