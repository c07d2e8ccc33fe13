"""Connection limits of a real ``longdl serve``: slow clients are dropped after
HTTP_KEEPALIVE_S, and connections beyond MAX_CONNECTIONS get a 503 at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import wait_for
from service import ServiceProcess

pytestmark = pytest.mark.slow

Serve = Callable[..., Awaitable[ServiceProcess]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServiceProcess]]]:
    """Start a real service with the given settings; stopped after the test."""
    started: list[ServiceProcess] = []

    async def start(**settings: str) -> ServiceProcess:
        service = ServiceProcess(tmp_path / "data", {"SHUTDOWN_GRACE_S": "0", **settings})
        started.append(service)
        await service.start()
        return service

    yield start
    for service in started:
        service.terminate()


class Connection:
    """One keep-alive HTTP/1.1 connection, requests sent by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str) -> tuple[int, bytes]:
        """One GET on this connection: its status and body."""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        return int(lines[0].split()[1]), await self.reader.readexactly(length)

    async def closed_by_server(self, timeout_s: float) -> bool:
        """Whether the server closes this connection within ``timeout_s``. A reset counts:
        a server closing a socket with bytes still unread in it (a trickling client's
        last byte) makes the kernel send RST instead of FIN."""
        try:
            async with asyncio.timeout(timeout_s):
                return b"" == await self.reader.read()
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


async def test_a_client_trickling_its_headers_is_dropped(serve: Serve) -> None:
    """A request whose headers never end (a byte every 0.2 s) is closed after
    HTTP_KEEPALIVE_S, not held for a minute or more."""
    service = await serve(HTTP_KEEPALIVE_S="1")
    connection = await Connection.open(service.port)
    connection.writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    async def trickle() -> None:
        while True:
            connection.writer.write(b"X")
            await asyncio.sleep(0.2)

    dripping = asyncio.create_task(trickle())
    try:
        assert await connection.closed_by_server(timeout_s=5.0)
    finally:
        dripping.cancel()
        connection.close()


async def test_connections_beyond_max_connections_get_503(serve: Serve) -> None:
    """With three connections open, a fourth is answered 503 with Retry-After and closed;
    once one of the three closes, a new connection is served."""
    limited = await serve(MAX_CONNECTIONS="3")
    await wait_until_served(limited)
    held = [await Connection.open(limited.port) for _ in range(3)]
    for connection in held:
        assert 200 == (await connection.get("/health"))[0]

    refused = await Connection.open(limited.port)
    raw = await asyncio.wait_for(refused.reader.read(), 5.0)
    head, _, body = raw.partition(b"\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 1" in head
    assert "TOO_MANY_CONNECTIONS" == json.loads(body)["code"]
    held.pop().close()
    await wait_until_served(limited)
    for connection in held:
        connection.close()


async def wait_until_served(service: ServiceProcess) -> None:
    """Wait until a new connection is served (a closed connection is counted out once
    the server has noticed it closed)."""

    async def served() -> bool:
        connection = await Connection.open(service.port)
        try:
            status, _ = await connection.get("/health")
        except (asyncio.IncompleteReadError, OSError):
            return False  # refused (503, closed) while a closed one was still counted
        finally:
            connection.close()
        return 200 == status

    assert await wait_for(served, timeout_s=10.0)
