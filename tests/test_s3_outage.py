"""An S3 outage in the middle of running jobs: /health says so, the jobs finish anyway."""

from __future__ import annotations

import asyncio
import io
import logging
import zipfile
from typing import Any

import aiohttp
import pytest
import yarl
from conftest import AppFactory, finished, initiate, wait_for
from s3server import SeaweedServer

from longdl.seed import demo_content

IDS = [70000, 70007, 70014, 70021]


async def test_jobs_complete_after_s3_comes_back(
    make_client: AppFactory, seaweed: SeaweedServer
) -> None:
    """S3 stops while jobs run and starts again: /health was 503, every job completes."""
    client = await make_client(
        **seaweed.settings(),
        # Each attempt spends 2 s "talking to upstream" before touching S3, so the jobs
        # are mid-flight when it stops; 20 attempts of >= 0.5 s each outlast a restart.
        download_delay_enabled=True,
        download_delay_min_ms=2000,
        download_delay_max_ms=2000,
        max_attempts=20,
        retry_base_ms=200,
        retry_max_ms=1000,
        s3_connect_timeout_s=1,
        s3_read_timeout_s=5,
    )
    job_ids = [await initiate(client, IDS), await initiate(client, IDS[:2])]

    async def job(job_id: str) -> dict[str, Any]:
        return dict(await (await client.get(f"/v1/download/status/{job_id}")).json())

    async def all_running() -> bool:
        return all([(await job(j))["status"] == "running" for j in job_ids])

    await wait_for(all_running, timeout_s=10)
    await asyncio.to_thread(seaweed.stop, kill=True)
    try:
        health = await client.get("/health")
        health_body = await health.json()

        async def all_retrying() -> bool:
            return all([(await job(j))["attempts"] >= 2 for j in job_ids])

        await wait_for(all_retrying, timeout_s=30)
    finally:
        await asyncio.to_thread(seaweed.start)
        await asyncio.to_thread(seaweed.wait_ready)

    bodies = [await finished(client, j, timeout_s=60) for j in job_ids]
    assert (503, "error") == (health.status, health_body["checks"]["storage"])
    assert ["completed", "completed"] == [body["status"] for body in bodies]
    assert 200 == (await client.get("/health")).status

    response = await client.get(f"/v1/download/{job_ids[0]}", allow_redirects=False)
    async with (
        aiohttp.ClientSession() as session,
        session.get(yarl.URL(response.headers["Location"], encoded=True)) as download,
    ):
        data = await download.read()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    assert {f"{i}.zip": demo_content(i) for i in IDS} == entries


async def test_maintenance_during_an_s3_outage_logs_a_line_not_a_traceback(
    make_client: AppFactory, seaweed: SeaweedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While S3 is away, the sweeps that look for orphaned uploads fail with a warning
    line each, not an ERROR traceback every tenth sweep."""
    caplog.set_level(logging.WARNING, logger="longdl")
    client = await make_client(
        **seaweed.settings(), sweep_interval_s=0.05, s3_connect_timeout_s=1, s3_read_timeout_s=2
    )
    await asyncio.to_thread(seaweed.stop, kill=True)
    try:

        async def sweep_met_the_outage() -> bool:
            return any(
                "maintenance failed" in r.getMessage() and "StorageUnavailable" in r.getMessage()
                for r in caplog.records
            )

        await wait_for(sweep_met_the_outage, timeout_s=30)
    finally:
        await asyncio.to_thread(seaweed.start)
        await asyncio.to_thread(seaweed.wait_ready)
    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert 200 == (await client.get("/health")).status
