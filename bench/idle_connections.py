"""Memory of a real ``longdl serve`` holding many waiting clients (SSE and long-polls).

The point of longdl is that clients wait cheaply: each one holds an event stream or a
long-poll instead of a worker. This opens ``CLIENTS`` event streams and then ``CLIENTS``
long-polls (``?wait=`` with the current ETag) on a job that does not change, and reads
the server's resident memory (VmRSS) before and after each wave. The baseline is the
same process's memory with no clients, measured in the same run; the figures are the
growth per held connection and the total as a share of the baseline.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CLIENTS = 500


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def settled_rss_kib(pid: int, timeout_s: float = 20.0) -> int:
    """VmRSS once it stopped moving (requests still being accepted grow it)."""
    deadline = time.monotonic() + timeout_s
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) < 64:
            return now
        last = now
    return last


async def wait_healthy(session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with session.get(f"{base}/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("longdl serve did not start")
        await asyncio.sleep(0.1)


def start_service(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``longdl serve`` with one slot, taken for ten minutes; returns it and its URL."""
    port = free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATA_DIR": str(data_dir),
        "LOG_LEVEL": "WARNING",
        "WORKER_CONCURRENCY": "1",
        "DOWNLOAD_DELAY_ENABLED": "true",
        "DOWNLOAD_DELAY_MIN_MS": "600000",
        "DOWNLOAD_DELAY_MAX_MS": "600000",
        "RATE_LIMIT_MAX_REQUESTS": "100000000",
        "RATE_LIMIT_POLL_MAX_REQUESTS": "100000000",
        "SSE_MAX_S": "300",
        "LONG_POLL_MAX_S": "25",
    }
    subprocess.run(
        [sys.executable, "-m", "longdl", "seed", "70000"], env=env, check=True, capture_output=True
    )
    return subprocess.Popen(
        [sys.executable, "-m", "longdl", "serve"], env=env
    ), f"http://127.0.0.1:{port}"


async def measure(proc: subprocess.Popen[bytes], base: str) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector, connector_owner=False) as session:
            await wait_healthy(session, base)
            body = {"file_ids": [70000]}
            async with session.post(f"{base}/v1/download/initiate", json=body):
                pass  # takes the only slot for ten minutes
            async with session.post(f"{base}/v1/download/initiate", json=body) as response:
                idle = await response.json()  # queued behind it: nothing changes
            status_url = base + idle["statusUrl"]
            async with session.get(status_url) as response:
                tag = response.headers["ETag"]
            baseline_kib = await settled_rss_kib(proc.pid)

            streams = [
                await session.get(base + idle["eventsUrl"]).__aenter__() for _ in range(CLIENTS)
            ]
            for stream in streams:  # each has its snapshot: the server holds it
                await stream.content.readuntil(b"\n\n")
                await stream.content.readuntil(b"\n\n")
            with_streams_kib = await settled_rss_kib(proc.pid)

            polls = [
                asyncio.create_task(
                    session.get(f"{status_url}?wait=25", headers={"If-None-Match": tag})
                )
                for _ in range(CLIENTS)
            ]
            with_polls_kib = await settled_rss_kib(proc.pid)
            for task in polls:
                task.cancel()
            await asyncio.gather(*polls, return_exceptions=True)
            for stream in streams:
                stream.close()
    finally:
        await connector.close()
    per_stream = (with_streams_kib - baseline_kib) / CLIENTS
    per_poll = (with_polls_kib - with_streams_kib) / CLIENTS
    total = with_polls_kib - baseline_kib
    return {
        "clients": f"{CLIENTS} event streams, then {CLIENTS} long-polls, on one idle job",
        "baseline_rss": f"{baseline_kib / 1024:.1f} MiB",
        "per_event_stream": f"{per_stream:.1f} KiB",
        "per_long_poll": f"{per_poll:.1f} KiB",
        "all_held": f"{total / 1024:.1f} MiB ({total / baseline_kib:.2f} x baseline)",
    }


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="longdl-bench-") as tmp:
        proc, base = start_service(Path(tmp) / "data")
        try:
            return asyncio.run(measure(proc, base))
        finally:
            proc.terminate()
            proc.wait(30)
