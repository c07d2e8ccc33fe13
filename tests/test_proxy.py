"""Behind a real nginx that kills requests held over 2 s, nothing longdl answers times out."""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import require_tool, test_settings, wait_for
from proxy import Nginx

from longdl.app import create_app
from longdl.client import SseParser
from longdl.engine import Artifact, Handler, JobContext
from longdl.seed import demo_content, seed
from longdl.web import keys

#: The proxy's read timeout; every job below takes longer.
PROXY_TIMEOUT_S = 2
JOB_DELAY_MS = 3500


@pytest.fixture
async def make_proxied(
    aiohttp_server: Any, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[tuple[str, web.Application]]]]:
    """Start a longdl app behind nginx; returns nginx's URL and the app."""
    nginx_binary = require_tool("nginx")
    proxies: list[Nginx] = []

    async def make(
        handlers: dict[str, Handler] | None = None, **overrides: Any
    ) -> tuple[str, web.Application]:
        app = create_app(test_settings(tmp_path / "data", **overrides), handlers=handlers)
        server = await aiohttp_server(app)
        await seed(app[keys.STORAGE], (70000, 70007))
        proxy = Nginx(nginx_binary, tmp_path / "nginx", server.port, PROXY_TIMEOUT_S)
        proxy.start()
        proxies.append(proxy)
        return proxy.url, app

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
async def behind_nginx(make_proxied: Callable[..., Awaitable[tuple[str, Any]]]) -> str:
    """A longdl app whose jobs take 3.5 s, reached through nginx; yields nginx's URL."""
    url, _ = await make_proxied(
        download_delay_enabled=True,
        download_delay_min_ms=JOB_DELAY_MS,
        download_delay_max_ms=JOB_DELAY_MS,
        long_poll_max_s=1,
    )
    return url


async def test_a_held_request_gets_504_through_the_proxy(behind_nginx: str) -> None:
    """The proxy is real: asking longdl to wait 10 s for a 3.5 s job is cut at 2 s."""
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(
            f"{behind_nginx}/v1/download/initiate",
            json={"file_ids": [70000]},
            headers={"Prefer": "wait=10"},
        ) as response:
            assert 504 == response.status
        assert time.monotonic() - started < JOB_DELAY_MS / 1000


async def test_start_through_the_proxy_answers_202_and_the_download_arrives(
    behind_nginx: str,
) -> None:
    """The original start endpoint through nginx: 202 at once, poll, then the ZIP."""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{behind_nginx}/v1/download/start", json={"file_id": 70000}
        ) as response:
            body = await response.json()
            assert 202 == response.status  # nginx added X-Forwarded-For: not a local caller
        poll_url = behind_nginx + body["pollingEndpoint"]

        async def completed() -> dict[str, Any] | None:
            async with session.get(poll_url) as poll:
                assert 200 == poll.status
                job: dict[str, Any] = await poll.json()
                return job if job["status"] == "completed" else None

        job = await wait_for(completed, timeout_s=30, interval_s=0.2)
        async with session.get(behind_nginx + job["links"]["result"]) as download:
            assert 200 == download.status
            assert demo_content(70000) == await download.read()


async def test_bundle_through_the_proxy_is_byte_identical(behind_nginx: str) -> None:
    """initiate, long-poll and download through nginx: no 504, the ZIP holds the sources."""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{behind_nginx}/v1/download/initiate", json={"file_ids": [70000, 70007]}
        ) as response:
            body = await response.json()
        status_url = behind_nginx + body["statusUrl"]
        tag = ""
        statuses = []
        while True:  # long-polls capped at 1 s, under the proxy's 2 s
            headers = {"If-None-Match": tag} if tag else {}
            async with session.get(f"{status_url}?wait=25", headers=headers) as poll:
                statuses.append(poll.status)
                if poll.status == 200:
                    job = await poll.json()
                    tag = poll.headers["ETag"]
                    if job["status"] == "completed":
                        break
            assert len(statuses) < 60
        assert 504 not in statuses
        async with session.get(behind_nginx + body["resultUrl"]) as download:
            data = await download.read()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert demo_content(70007) == archive.read("70007.zip")


class Stepper:
    """A job kind that moves only when the test says so, then finishes."""

    def __init__(self) -> None:
        self.step = asyncio.Event()
        self.finish = asyncio.Event()

    async def handler(self, ctx: JobContext) -> Artifact:
        await self.step.wait()
        ctx.report(percent=50, message="Half way")
        await self.finish.wait()
        info = await ctx.storage.write_bytes(f"bundles/{ctx.job_id}.txt", b"ok")
        return Artifact(key=info.key, filename="ok.txt", size_bytes=info.size_bytes)


async def test_events_pass_the_proxy_one_by_one_and_outlive_its_timeout(
    make_proxied: Callable[..., Awaitable[tuple[str, web.Application]]],
) -> None:
    """Through nginx, each SSE event arrives as it happens (no buffering), and heartbeats
    keep a stream idle for longer than the proxy's read timeout alive."""
    stepper = Stepper()
    url, app = await make_proxied(
        handlers={"step": stepper.handler}, sse_heartbeat_s=0.5, sse_max_s=20
    )
    job = (await app[keys.ENGINE].submit("step", {})).job
    parser = SseParser()
    messages: list[tuple[str, str]] = []
    pings = 0
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/download/{job.id}/events") as response,
    ):
        assert 200 == response.status
        last_event_at = time.monotonic()
        async for chunk in response.content.iter_any():
            pings += chunk.count(b": ping")
            for event in parser.feed(chunk):
                if event.data:
                    body = json.loads(event.data)
                    messages.append((event.event, body["progress"]["message"]))
                    last_event_at = time.monotonic()
                    if body["progress"]["message"] == "Half way":
                        stepper.finish.set()  # seen while the job still runs: unbuffered
            if time.monotonic() - last_event_at > PROXY_TIMEOUT_S + 1:
                stepper.step.set()  # idle past the proxy timeout, and still connected
    assert ("progress", "Half way") in messages
    assert "status" == messages[-1][0]
    assert messages.index(("progress", "Half way")) < len(messages) - 1
    assert pings >= 2 * PROXY_TIMEOUT_S
