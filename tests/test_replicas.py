"""Replicas on one PostgreSQL, in one process: each app is a replica with its own engine,
worker id and listener, sharing the database and a storage folder."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import urllib.parse
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate, wait_for
from pgserver import PostgresServer
from service import free_port
from test_lifecycle import job_at_gate, status_of, write_failed
from test_webhooks import delivery_when, hook_settings, start_receiver

from longdl.engine import Artifact, JobContext
from longdl.storage import LocalStorage
from longdl.web import keys

SECRET = "s" * 32


class Gate:
    """A job kind that waits for the test, on whichever replica claims it."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.release = asyncio.Event()
        self.stopped: list[str | None] = []

    async def handler(self, ctx: JobContext) -> Artifact:
        self.started.put_nowait(ctx.job_id)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.stopped.append(ctx.stop_reason)
            raise
        info = await ctx.storage.write_bytes(f"bundles/{ctx.job_id}.txt", b"done")
        return Artifact(key=info.key, filename="done.txt", size_bytes=info.size_bytes)


async def replica(
    make_client: AppFactory, database_url: str, tmp_path: Path, name: str, **overrides: Any
) -> TestClient[Any, Any]:
    storage = LocalStorage(tmp_path / "shared", SECRET.encode())
    settings = {"signing_secret": SECRET, "webhook_secret": SECRET, **overrides}
    return await make_client(
        database_url=database_url, data_dir=tmp_path / name, storage=storage, **settings
    )


async def test_a_job_runs_on_postgres_end_to_end(
    make_client: AppFactory, database_url: str, tmp_path: Path
) -> None:
    """initiate, poll, result: the same contract on PostgreSQL."""
    client = await replica(make_client, database_url, tmp_path, "a")
    job_id = await initiate(client, [70000, 70007])
    body = await finished(client, job_id)
    assert "completed" == body["status"]
    response = await client.get(f"/v1/download/{job_id}", allow_redirects=False)
    assert 302 == response.status


async def test_a_long_poll_on_one_replica_hears_a_change_on_another(
    make_client: AppFactory, database_url: str, tmp_path: Path
) -> None:
    """A long-poll waiting on replica B answers as soon as replica A changes the job."""
    gate = Gate()
    a = await replica(make_client, database_url, tmp_path, "a", handlers={"g": gate.handler})
    # B only answers requests: A runs every job.
    b = await replica(make_client, database_url, tmp_path, "b", worker_concurrency=0)
    job_id = (await a.app[keys.ENGINE].submit("g", {})).job.id
    await asyncio.wait_for(gate.started.get(), 10)
    first = await b.get(f"/v1/download/status/{job_id}")
    tag = first.headers["ETag"]
    poll = asyncio.ensure_future(
        b.get(f"/v1/download/status/{job_id}?wait=20", headers={"If-None-Match": tag})
    )

    async def waiting() -> bool:
        return b.app[keys.ENGINE].hub.is_watched(job_id)

    await wait_for(waiting)
    released = time.monotonic()
    gate.release.set()
    response = await asyncio.wait_for(poll, 10)
    assert 200 == response.status
    assert (await response.json())["status"] in ("completed",)
    assert time.monotonic() - released < 2


async def test_a_cancel_on_one_replica_stops_the_job_on_another(
    make_client: AppFactory, database_url: str, tmp_path: Path
) -> None:
    """Canceling through replica B a job running on replica A stops it on A within a
    second, as a cancel."""
    gate = Gate()
    a = await replica(make_client, database_url, tmp_path, "a", handlers={"g": gate.handler})
    b = await replica(make_client, database_url, tmp_path, "b", worker_concurrency=0)
    job_id = (await a.app[keys.ENGINE].submit("g", {})).job.id
    await asyncio.wait_for(gate.started.get(), 10)
    canceled_at = time.monotonic()
    response = await b.post(f"/v1/download/cancel/{job_id}")
    assert 200 == response.status

    async def stopped() -> bool:
        return bool(gate.stopped)

    await wait_for(stopped, 5, interval_s=0.01)
    assert time.monotonic() - canceled_at < 1
    assert ["cancel"] == gate.stopped
    assert "canceled" == (await finished(a, job_id))["status"]


async def test_a_delivery_cut_by_one_replica_stopping_goes_out_from_another_at_once(
    make_client: AppFactory, database_url: str, tmp_path: Path, aiohttp_server: Any
) -> None:
    """The replica sending a webhook stops with the attempt in flight: the other, up and
    idle, sends the delivery within seconds, not when the lease on it runs out
    (2 x WEBHOOK_TIMEOUT_S + 5 s, 25 s here)."""
    receiver = await start_receiver(aiohttp_server)
    receiver.stall = asyncio.Event()
    replicas = [
        await replica(make_client, database_url, tmp_path, name, **hook_settings())
        for name in ("a", "b")
    ]
    job_id = await initiate(replicas[0], [70000], callbackUrl=receiver.url)

    async def in_flight() -> bool:
        return receiver.stalled == 1

    await wait_for(in_flight)
    conn = await asyncpg.connect(database_url)
    try:
        sender = await conn.fetchval(
            "SELECT lease_owner FROM webhook_deliveries WHERE job_id = $1", job_id
        )
    finally:
        await conn.close()
    [stopping] = [r for r in replicas if r.app[keys.ENGINE].worker_id == sender]
    [other] = [r for r in replicas if r is not stopping]
    await stopping.close()
    stopped = time.monotonic()
    receiver.stall.set()

    delivery = await delivery_when(other, job_id, "delivered", timeout_s=10)
    assert time.monotonic() - stopped < 5
    assert [delivery.id] == [r.headers["webhook-id"] for r in receiver.acknowledged()]


@pytest.mark.parametrize("write", ["status", "output"])
async def test_a_running_job_waits_out_a_database_outage_instead_of_retrying(
    make_client: AppFactory,
    database_url: str,
    postgres: PostgresServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    write: str,
) -> None:
    """The database goes away (its connections cut, new ones refused) just as a running
    job enters its artifact phase or notes its bundle: the job waits where it is and
    completes once the database is back, on its first attempt, instead of failing the
    attempt and starting over."""
    caplog.set_level(logging.WARNING, logger="longdl.engine")
    a_replica = functools.partial(replica, make_client, database_url, tmp_path, "a")
    job, client, job_id = await job_at_gate(a_replica, write)

    name = urllib.parse.urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(postgres.url())
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        try:
            job.go.set()
            await wait_for(write_failed(caplog))
            assert "running" == await status_of(client, job_id)
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()

    body = await finished(client, job_id, timeout_s=30)
    assert ("completed", 1, 1) == (body["status"], body["attempts"], job.runs), body


async def test_replicas_need_shared_secrets(
    make_client: AppFactory, database_url: str, tmp_path: Path
) -> None:
    """With DATABASE_URL and no SIGNING_SECRET (and no key in DATA_DIR), a replica
    refuses to start, saying why."""
    with pytest.raises(ValueError, match="SIGNING_SECRET"):
        await make_client(database_url=database_url, data_dir=tmp_path / "x")


async def test_a_replica_started_while_postgres_is_away_waits_for_it(
    make_client: AppFactory, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica started while PostgreSQL cannot be reached (restarting, not up yet)
    logs a warning line per try and starts once it is back (it exited with a traceback).
    The way to it here is a TCP port that refuses until a forwarder to the server's
    socket opens on it."""
    socket_path = _server_socket(database_url)
    port = free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}{urllib.parse.urlsplit(database_url).path}"
    starting = asyncio.ensure_future(replica(make_client, url, tmp_path, "a"))

    async def tried() -> bool:
        return any("store.unavailable at start-up" in r.getMessage() for r in caplog.records)

    await wait_for(tried, 20)
    assert not starting.done()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    forwarder = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        client = await asyncio.wait_for(starting, 30)
        assert 200 == (await client.get("/health")).status
        job_id = await initiate(client, [70000])
        assert "completed" == (await finished(client, job_id))["status"]
        await client.close()
    finally:
        forwarder.close()
    warnings = [r for r in caplog.records if "at start-up" in r.getMessage()]
    assert {(logging.WARNING, None)} == {(r.levelno, r.exc_info) for r in warnings}


def _server_socket(database_url: str) -> str:
    """The Unix socket the session's PostgreSQL listens on (its URL's ``host`` folder)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(database_url).query)
    (path,) = (p for p in Path(query["host"][0]).glob(".s.PGSQL.*") if p.suffix != ".lock")
    return str(path)
