"""Shared fixtures: real apps on real SQLite files and real storage folders."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from longdl.app import create_app
from longdl.config import Settings
from longdl.engine import Handler
from longdl.seed import seed
from longdl.storage import Storage
from longdl.web import keys

T = TypeVar("T")

#: Small demo files every app fixture seeds (4 KiB .. 32 KiB).
DEMO_IDS = (70000, 70007, 70014, 70021)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, but fail in CI where it must exist."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


async def wait_for(
    probe: Callable[[], Awaitable[T | None]], timeout_s: float = 10.0, interval_s: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something truthy, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


def test_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a fast, quiet test app on ``data_dir``."""
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "download_delay_enabled": False,
        "progress_flush_ms": 50,
        "retry_base_ms": 20,
        "retry_max_ms": 100,
        "sweep_interval_s": 3600,
        "shutdown_grace_s": 0,
        # Tests hammer one app from one address; the limits have tests of their own.
        "rate_limit_max_requests": 100_000,
        "rate_limit_poll_max_requests": 100_000,
    }
    base.update(overrides)
    return Settings(**base)


test_settings.__test__ = False  # type: ignore[attr-defined]


AppFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> AppFactory:
    """Start a real longdl app on a fresh data dir; keyword arguments override settings.

    ``handlers=`` adds job kinds, ``storage=`` replaces the storage backend and
    ``seed_ids=`` chooses the demo files written before the first request.
    """

    async def make(
        *,
        handlers: dict[str, Handler] | None = None,
        storage: Storage | None = None,
        seed_ids: tuple[int, ...] = DEMO_IDS,
        data_dir: Path | None = None,
        **overrides: Any,
    ) -> TestClient[web.Request, web.Application]:
        settings = test_settings(data_dir or tmp_path / "data", **overrides)
        app = create_app(settings, handlers=handlers, storage=storage)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        await seed(app[keys.STORAGE], seed_ids)
        return client

    return make


@pytest.fixture
async def client(
    make_client: AppFactory,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A default app with the small demo files seeded."""
    yield await make_client()


async def initiate(client: TestClient[Any, Any], file_ids: list[int], **extra: Any) -> str:
    """Start a download job and return its id (asserting the 202)."""
    response = await client.post("/v1/download/initiate", json={"file_ids": file_ids, **extra})
    assert 202 == response.status, await response.text()
    return str((await response.json())["jobId"])


async def finished(
    client: TestClient[Any, Any], job_id: str, timeout_s: float = 20.0
) -> dict[str, Any]:
    """Poll the status route until the job finishes; return its last resource."""

    async def probe() -> dict[str, Any] | None:
        response = await client.get(f"/v1/download/status/{job_id}")
        body: dict[str, Any] = await response.json()
        return body if body["status"] in ("completed", "failed", "canceled", "expired") else None

    return await wait_for(probe, timeout_s)


#: A bundle's file name: bundles/{job_id}.zip, or {job_id}.{stalls}.zip when written by a
#: run that took the job over from a stalled or dead one.
BUNDLE_NAME = re.compile(r"^([0-9a-f-]{36})(?:\.[0-9]+)?\.zip$")


def bundles_by_job(names: Iterable[str], trashed: Iterable[str] = ()) -> dict[str, str]:
    """The bundle file of each job among the file ``names`` of bundles/, leaving out
    the keys waiting in the trash (a run cut after its rename, before it completed,
    whose bundle the run that took over trashes); fails on a job with two."""
    waiting = {key.removeprefix("bundles/") for key in trashed}
    found: dict[str, str] = {}
    for name in names:
        if name in waiting:
            continue
        match = BUNDLE_NAME.match(name)
        assert match is not None, name
        assert match[1] not in found, (name, found.get(match[1]))
        found[match[1]] = name
    return found


# A real S3 server (SeaweedFS) and a real PostgreSQL for the tests that ask for them;
# each is started once per session.
from pgserver import database_url, postgres  # noqa: E402, F401
from s3server import make_s3_storage, s3_storage, seaweed  # noqa: E402, F401


class Receiver:
    """A webhook receiver recording each delivery's webhook-id and job."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.deliveries.append((request.headers["webhook-id"], body["data"]["jobId"]))
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    recorder = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recorder.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield recorder, str(server.make_url("/hook"))
    finally:
        await server.close()
