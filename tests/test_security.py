"""Who may do what: proxied callers are never local, key guessing is limited, /metrics
is private with keys, open-mode history is the caller's own, job errors and stored
files keep server details private."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import AppFactory

SLOW = {
    "download_delay_enabled": True,
    "download_delay_min_ms": 3000,
    "download_delay_max_ms": 3000,
}
KEYS = {"api_keys": ["alice:alice-key-0123456789", "bob:bob-key-0123456789"]}
ALICE = {"Authorization": "Bearer alice-key-0123456789"}
REPO = Path(__file__).resolve().parent.parent

# --- proxies are never local (DESIGN.md §3) ----------------------------------------------

#: What proxies, CDNs and tunnels add; with any of them a caller is not local.
PROXY_HEADERS = {
    "Via": "1.1 tunnel",
    "X-Forwarded-Host": "localhost:3000",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Port": "443",
    "True-Client-IP": "203.0.113.9",
    "X-Client-IP": "203.0.113.9",
    "Client-IP": "203.0.113.9",
    "X-Cluster-Client-IP": "203.0.113.9",
    "Fastly-Client-IP": "203.0.113.9",
    "CF-Ray": "8a1b2c3d4e5f-AMS",
    "CF-Visitor": '{"scheme":"https"}',
    "CDN-Loop": "cloudflare",
    "X-Amzn-Trace-Id": "Root=1-67891233-abcdef012345678912345678",
    "Fly-Client-IP": "203.0.113.9",
    "X-Envoy-External-Address": "203.0.113.9",
    "Tailscale-User-Login": "someone@example.com",
}


@pytest.mark.parametrize(("name", "value"), PROXY_HEADERS.items(), ids=PROXY_HEADERS)
async def test_a_request_through_a_proxy_or_tunnel_never_waits(
    client: TestClient[Any, Any], name: str, value: str
) -> None:
    """From loopback, with no Origin, but bearing a proxy's header: 202 at once."""
    response = await client.post(
        "/v1/download/start", json={"file_id": 70000}, headers={name: value}
    )
    assert 202 == response.status
    assert (await response.json())["pollingEndpoint"]


def test_the_design_lists_every_proxy_header_the_code_knows() -> None:
    """docs/DESIGN.md §3 names each header and family policy.py treats as a proxy's."""
    from longdl.web import policy

    design = (REPO / "docs" / "DESIGN.md").read_text().lower()
    section = design[design.index("## 3.") : design.index("## 4.")]
    names = [*policy.PROXY_HEADERS, *(f"{p}*" for p in policy.PROXY_HEADER_PREFIXES)]
    assert [] == [name for name in names if f"`{name}`" not in section]


async def test_a_forged_origin_holds_only_its_own_request_for_sync_wait_max_s(
    make_client: AppFactory,
) -> None:
    """A remote caller claiming Origin: http://localhost waits at most SYNC_WAIT_MAX_S,
    then gets the 202 anyone gets, while the service answers others meanwhile."""
    client = await make_client(
        sync_wait_max_s=1.0,
        download_delay_enabled=True,
        download_delay_min_ms=6000,
        download_delay_max_ms=6000,
    )
    started = time.monotonic()
    forged = asyncio.ensure_future(
        client.post(
            "/v1/download/start",
            json={"file_id": 70000},
            headers={"Origin": "http://localhost"},
        )
    )
    health = asyncio.ensure_future(client.get("/health"))

    done, _ = await asyncio.wait({forged, health}, return_when=asyncio.FIRST_COMPLETED)
    response = await forged
    elapsed_s = time.monotonic() - started

    assert {health} == done
    assert 202 == response.status
    assert (await response.json())["status"] in ("queued", "running")
    assert 1.0 <= elapsed_s < 5.0  # held for the cap, not for the 6 s job


async def test_a_forged_origin_through_a_proxy_does_not_wait_at_all(
    make_client: AppFactory,
) -> None:
    """Origin: localhost with a proxy's header is remote: 202 without waiting (a local
    caller would wait the 3 s job out and get 200)."""
    client = await make_client(sync_wait_max_s=5.0, **SLOW)
    response = await client.post(
        "/v1/download/start",
        json={"file_id": 70000},
        headers={"Origin": "http://localhost", "Via": "1.1 tunnel"},
    )
    assert 202 == response.status
    assert "queued" == (await response.json())["status"]
