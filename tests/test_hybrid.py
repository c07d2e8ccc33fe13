"""Synchronous and hybrid modes: /v1/download/start and Prefer (DESIGN.md §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished
from yarl import URL

from longdl.seed import demo_content

SLOW = {
    "download_delay_enabled": True,
    "download_delay_min_ms": 3000,
    "download_delay_max_ms": 3000,
}


async def test_local_start_answers_the_original_completed_shape(
    client: TestClient[Any, Any],
) -> None:
    """From loopback without Origin, start waits and answers as the original service did."""
    response = await client.post("/v1/download/start", json={"file_id": 70007})
    body = await response.json()

    assert 200 == response.status
    assert {"file_id", "status", "downloadUrl", "size", "processingTimeMs", "message"} == set(body)
    assert (70007, "completed", len(demo_content(70007))) == (
        body["file_id"],
        body["status"],
        body["size"],
    )
    assert body["processingTimeMs"] >= 0
    assert "Prefer" in response.headers["Vary"]
    async with ClientSession() as session, session.get(URL(body["downloadUrl"])) as download:
        assert demo_content(70007) == await download.read()


async def test_local_start_of_a_missing_file_answers_failed(client: TestClient[Any, Any]) -> None:
    """A file that does not exist gives the original failed shape with the reason."""
    response = await client.post("/v1/download/start", json={"file_id": 99999})
    body = await response.json()
    assert 200 == response.status
    assert ("failed", None, None) == (body["status"], body["downloadUrl"], body["size"])
    assert "99999" in body["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://app.example.com"},
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"CF-Connecting-IP": "203.0.113.9"},
        {"X-Real-IP": "203.0.113.9"},
        {"Origin": "http://localhost:5173", "X-Forwarded-For": "127.0.0.1"},
        {"Referer": "https://app.example.com/downloads"},
        {"Origin": "null"},
    ],
)
async def test_remote_or_proxied_start_gets_202_and_a_polling_endpoint(
    client: TestClient[Any, Any], headers: dict[str, str]
) -> None:
    """A non-local Origin or any forwarding header means 202 at once, never a wait."""
    response = await client.post("/v1/download/start", json={"file_id": 70000}, headers=headers)
    body = await response.json()
    assert 202 == response.status
    assert body["jobId"]
    assert f"/v1/download/status/{body['jobId']}" == body["statusUrl"] == body["pollingEndpoint"]
    assert body["statusUrl"] == response.headers["Location"]
    assert 70000 == body["file_id"]


async def test_local_origin_is_synchronous(client: TestClient[Any, Any]) -> None:
    """A dev frontend on localhost (another port) still gets the synchronous answer."""
    response = await client.post(
        "/v1/download/start", json={"file_id": 70000}, headers={"Origin": "http://localhost:5173"}
    )
    assert 200 == response.status
    assert "completed" == (await response.json())["status"]


async def test_respond_async_makes_a_local_start_202(client: TestClient[Any, Any]) -> None:
    """Prefer: respond-async is honoured even for a local caller, and says so."""
    response = await client.post(
        "/v1/download/start", json={"file_id": 70000}, headers={"Prefer": "respond-async"}
    )
    assert 202 == response.status
    assert "respond-async" == response.headers["Preference-Applied"]


async def test_local_start_that_outlasts_the_sync_cap_gets_202(make_client: AppFactory) -> None:
    """A job longer than SYNC_WAIT_MAX_S turns into 202 instead of holding the request."""
    client = await make_client(sync_wait_max_s=0.5, **SLOW)
    response = await client.post("/v1/download/start", json={"file_id": 70000})
    assert 202 == response.status
    assert "running" == (await response.json())["status"]


async def test_prefer_wait_on_initiate_returns_the_finished_job(
    client: TestClient[Any, Any],
) -> None:
    """Prefer: wait=20 on a short job answers 200 with the completed job resource."""
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": [70000, 70007]}, headers={"Prefer": "wait=20"}
    )
    body = await response.json()
    assert 200 == response.status
    assert "completed" == body["status"]
    assert body["downloadUrl"]
    assert "wait=20" == response.headers["Preference-Applied"]
    assert "Prefer" in response.headers["Vary"]


async def test_prefer_wait_is_capped_by_sync_wait_max_s(make_client: AppFactory) -> None:
    """A long job with Prefer: wait=60 returns 202 after SYNC_WAIT_MAX_S, saying so."""
    client = await make_client(sync_wait_max_s=0.5, **SLOW)
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": [70000]}, headers={"Prefer": "wait=60"}
    )
    assert 202 == response.status
    assert "wait=0.5" == response.headers["Preference-Applied"]


async def test_initiate_never_waits_unasked(make_client: AppFactory) -> None:
    """Without Prefer, initiate answers 202 queued even for a local caller."""
    client = await make_client(**SLOW)
    response = await client.post("/v1/download/initiate", json={"file_ids": [70000]})
    assert 202 == response.status
    assert "queued" == (await response.json())["status"]
    assert "Preference-Applied" not in response.headers


async def test_remote_start_with_prefer_wait_gets_the_original_shape(
    client: TestClient[Any, Any],
) -> None:
    """A remote caller that explicitly asks to wait gets the synchronous answer too."""
    response = await client.post(
        "/v1/download/start",
        json={"file_id": 70000},
        headers={"Origin": "https://app.example.com", "Prefer": "wait=10"},
    )
    assert 200 == response.status
    assert "completed" == (await response.json())["status"]


async def test_download_url_forms_and_public_url(make_client: AppFactory, tmp_path: Path) -> None:
    """Status answers a relative local URL, start an absolute one on the request's host;
    with PUBLIC_URL both are absolute on it; the spec says so on each field."""
    plain = await make_client()
    public = await make_client(public_url="https://dl.example.com", data_dir=tmp_path / "public")
    forms = []
    for client in (plain, public):
        started = await (await client.post("/v1/download/start", json={"file_id": 70000})).json()
        job_id = await initiate_finished(client)
        status = await (await client.get(f"/v1/download/status/{job_id}")).json()
        forms.append((status["downloadUrl"], started["downloadUrl"]))
    origin = str(plain.make_url("/")).rstrip("/")

    (plain_status, plain_start), (public_status, public_start) = forms
    assert plain_status.startswith("/files/")
    assert plain_start.startswith(f"{origin}/files/")
    assert public_status.startswith("https://dl.example.com/files/")
    assert public_start.startswith("https://dl.example.com/files/")
    spec = await (await plain.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    assert "relative" in schemas["JobOut"]["properties"]["downloadUrl"]["description"]
    assert "PUBLIC_URL" in schemas["StartOut"]["properties"]["downloadUrl"]["description"]


async def initiate_finished(client: TestClient[Any, Any]) -> str:
    response = await client.post("/v1/download/initiate", json={"file_ids": [70000, 70007]})
    job_id = str((await response.json())["jobId"])
    await finished(client, job_id)
    return job_id
