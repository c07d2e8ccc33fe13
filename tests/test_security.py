"""Who may do what: proxied callers are never local, key guessing is limited, /metrics
is private with keys, open-mode history is the caller's own, job errors and stored
files keep server details private."""

from __future__ import annotations

import asyncio
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate

from longdl.engine import Artifact, JobContext
from longdl.web import keys

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


# --- key guessing -------------------------------------------------------------------------


async def test_wrong_keys_beyond_the_budget_get_429_with_retry_after(
    make_client: AppFactory,
) -> None:
    """Three wrong keys are 401; the fourth attempt, even with a valid key, is 429."""
    client = await make_client(rate_limit_auth_failures=3, **KEYS)
    wrong = [
        await client.get("/v1/download/history", headers={"Authorization": f"Bearer guess-{i}"})
        for i in range(3)
    ]
    refused = await client.get("/v1/download/history", headers={"Authorization": "Bearer guess"})
    valid = await client.get("/v1/download/history", headers=ALICE)

    assert [401] * 3 == [r.status for r in wrong]
    assert (429, 429) == (refused.status, valid.status)
    assert "TOO_MANY_AUTH_FAILURES" == (await valid.json())["code"]
    assert 1 <= int(valid.headers["Retry-After"]) <= 60


async def test_key_failures_count_per_address(make_client: AppFactory) -> None:
    """One address guessing does not lock out another (behind a trusted proxy)."""
    client = await make_client(rate_limit_auth_failures=2, trusted_proxies=["127.0.0.0/8"], **KEYS)
    for _ in range(3):
        await client.get(
            "/v1/download/history",
            headers={"Authorization": "Bearer guess", "X-Forwarded-For": "198.51.100.1"},
        )
    other = await client.get(
        "/v1/download/history", headers={**ALICE, "X-Forwarded-For": "198.51.100.2"}
    )
    assert 200 == other.status


async def test_requests_without_a_key_do_not_use_the_budget(make_client: AppFactory) -> None:
    """A client that has not sent a key yet (a page asking for one) is not guessing."""
    client = await make_client(rate_limit_auth_failures=2, **KEYS)
    missing = [await client.get("/v1/download/history") for _ in range(5)]
    valid = await client.get("/v1/download/history", headers=ALICE)
    assert ([401] * 5, 200) == ([r.status for r in missing], valid.status)


# --- /metrics -----------------------------------------------------------------------------


async def test_metrics_need_a_key_when_api_keys_are_set(make_client: AppFactory) -> None:
    """With API_KEYS, /metrics without a key is a 401 problem; with one it is served."""
    client = await make_client(**KEYS)
    anonymous = await client.get("/metrics")
    keyed = await client.get("/metrics", headers=ALICE)
    assert (401, 200) == (anonymous.status, keyed.status)
    assert "application/problem+json" == anonymous.content_type
    assert "longdl_queue_depth" in await keyed.text()


async def test_metrics_token_opens_metrics_and_nothing_else(make_client: AppFactory) -> None:
    """METRICS_TOKEN lets a scraper in to /metrics only; a wrong token is 401."""
    token = {"Authorization": "Bearer scrape-token-0123456789"}
    client = await make_client(metrics_token="scrape-token-0123456789", **KEYS)
    scraped = await client.get("/metrics", headers=token)
    wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
    api = await client.get("/v1/download/history", headers=token)
    assert (200, 401, 401) == (scraped.status, wrong.status, api.status)


async def test_metrics_token_alone_guards_metrics_in_open_mode(make_client: AppFactory) -> None:
    """Without API keys, METRICS_TOKEN still keeps /metrics private; /v1 stays open."""
    client = await make_client(metrics_token="scrape-token-0123456789")
    assert 401 == (await client.get("/metrics")).status
    assert 200 == (await client.get("/v1/download/history")).status


# --- open-mode history ----------------------------------------------------------------------


async def test_open_mode_history_lists_only_the_callers_own_jobs(make_client: AppFactory) -> None:
    """Without keys, each address sees its own jobs in history and nobody else's."""
    client = await make_client(trusted_proxies=["127.0.0.0/8"])

    def address(ip: str) -> dict[str, str]:
        return {"X-Forwarded-For": ip}

    first = await initiate_from(client, "198.51.100.1", [70000])
    second = await initiate_from(client, "198.51.100.2", [70007])
    listed = {}
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        page = await (await client.get("/v1/download/history", headers=address(ip))).json()
        listed[ip] = [item["jobId"] for item in page["items"]]

    assert {"198.51.100.1": [first], "198.51.100.2": [second], "198.51.100.3": []} == listed


async def initiate_from(client: TestClient[Any, Any], ip: str, file_ids: list[int]) -> str:
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": file_ids}, headers={"X-Forwarded-For": ip}
    )
    assert 202 == response.status
    return str((await response.json())["jobId"])


# --- what clients and other users see -------------------------------------------------------


async def test_a_job_error_keeps_server_paths_out_and_logs_them(
    make_client: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Local storage failing with an OSError fails the job with a reason that names no
    server path; the log has the full error."""

    async def long_name(ctx: JobContext) -> Artifact:
        # A name longer than any filesystem allows: stat() raises a real ENAMETOOLONG.
        await ctx.storage.head(f"downloads/{'x' * 300}.zip")
        raise AssertionError("head() should have raised")

    client = await make_client(handlers={"long_name": long_name}, max_attempts=1)
    inserted = await client.app[keys.ENGINE].submit("long_name", {}, owner="")

    body = await finished(client, inserted.job.id)

    assert ("failed", "STORAGE_UNAVAILABLE") == (body["status"], body["error"]["code"])
    assert "File name too long" in body["error"]["message"]
    assert str(tmp_path) not in str(body)
    assert str(tmp_path) in caplog.text


async def test_stored_files_and_folders_are_private_to_the_service_user(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """Source files, bundles and their folders are created 0600 / 0700."""
    client = await make_client()
    await finished(client, await initiate(client, [70000, 70007]))
    root = client.app[keys.SETTINGS].storage_dir

    modes = {
        str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode)
        for path in [root, *root.rglob("*")]
    }

    assert 0o700 == modes["."]
    assert {0o700} == {mode for name, mode in modes.items() if (root / name).is_dir()}
    assert {0o600} == {mode for name, mode in modes.items() if (root / name).is_file()}
    assert any(re.fullmatch(r"bundles/[0-9a-f-]{36}\.zip", name) for name in modes)
