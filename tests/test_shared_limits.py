"""Rate limits shared by replicas through a real Redis (Debian's redis-server), and
per replica without it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AppFactory, require_tool
from service import free_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server in the foreground on a free port; its URL and process."""
    binary = require_tool("redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)  # polling interval of a deadline loop
    try:
        yield f"redis://127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait()


async def statuses(clients: list[object], count: int) -> list[int]:
    """GET /v1/download/history ``count`` times, alternating between the clients."""
    result = []
    for i in range(count):
        client = clients[i % len(clients)]
        response = await client.get("/v1/download/history")  # type: ignore[attr-defined]
        result.append(response.status)
    return result


async def test_replicas_share_one_budget_through_redis(
    make_client: AppFactory, tmp_path: Path, redis_server: tuple[str, object]
) -> None:
    """Two replicas with RATE_LIMIT_STORAGE_URI count one caller's requests together."""
    url, _ = redis_server
    settings = {"rate_limit_storage_uri": url, "rate_limit_max_requests": 10}
    a = await make_client(data_dir=tmp_path / "a", **settings)
    b = await make_client(data_dir=tmp_path / "b", **settings)
    assert [200] * 10 + [429] * 4 == await statuses([a, b], 14)


async def test_without_shared_storage_each_replica_counts_alone(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """Without it, each replica has the whole budget (documented)."""
    a = await make_client(data_dir=tmp_path / "a", rate_limit_max_requests=10)
    b = await make_client(data_dir=tmp_path / "b", rate_limit_max_requests=10)
    assert [200] * 14 == await statuses([a, b], 14)


async def test_an_unreachable_limiter_lets_requests_through(
    make_client: AppFactory, redis_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """When the shared counters cannot be reached, the API keeps answering."""
    url, proc = redis_server
    client = await make_client(rate_limit_storage_uri=url, rate_limit_max_requests=10)
    proc.kill()
    proc.wait()
    assert [200, 200] == await statuses([client], 2)


def test_a_uri_naming_no_storage_is_refused_at_start(tmp_path: Path) -> None:
    """A RATE_LIMIT_STORAGE_URI the limits library does not know stops the start."""
    from conftest import test_settings

    from longdl.app import create_app

    with pytest.raises(ValueError, match="RATE_LIMIT_STORAGE_URI"):
        create_app(test_settings(tmp_path, rate_limit_storage_uri="nosuch://x"))


async def test_a_limiter_in_the_librarys_memory_storage_counts(
    make_client: AppFactory,
) -> None:
    """RATE_LIMIT_STORAGE_URI=memory:// keeps the limits library's counters: 429 once spent."""
    client = await make_client(rate_limit_storage_uri="memory://", rate_limit_max_requests=3)
    assert [200, 200, 200, 429] == await statuses([client], 4)


def test_a_service_without_shared_storage_does_not_load_the_library(tmp_path: Path) -> None:
    """Without RATE_LIMIT_STORAGE_URI the app never imports limits (2 MB less memory)."""
    code = (
        "import sys\n"
        "from longdl.app import create_app\n"
        "from longdl.config import Settings\n"
        f"create_app(Settings(data_dir={str(tmp_path)!r}))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'limits'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "[]" == out.stdout.strip()
