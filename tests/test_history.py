"""GET /v1/download/history: the caller's jobs, newest first, with an opaque cursor."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import finished, initiate


async def page(client: TestClient[Any, Any], query: str) -> dict[str, Any]:
    response = await client.get(f"/v1/download/history?{query}")
    assert 200 == response.status, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_pages_cover_every_job_once_newest_first(client: TestClient[Any, Any]) -> None:
    """Following nextCursor with limit=2 walks all five jobs, newest first, no repeats."""
    created = [await initiate(client, [70000]) for _ in range(5)]
    seen: list[str] = []
    cursor = ""
    while True:
        body = await page(client, f"limit=2{cursor}")
        assert len(body["items"]) <= 2
        seen.extend(item["jobId"] for item in body["items"])
        if body["nextCursor"] is None:
            break
        cursor = f"&cursor={body['nextCursor']}"
    assert list(reversed(created)) == seen


async def test_filters_by_status_and_user(client: TestClient[Any, Any]) -> None:
    """status (repeated or comma-separated) and userId narrow the list."""
    ok = await initiate(client, [70000], userId="alice")
    bad = await initiate(client, [99999], userId="alice")
    other = await initiate(client, [70007], userId="bob")
    for job_id in (ok, bad, other):
        await finished(client, job_id)

    failed = await page(client, "status=failed")
    assert [bad] == [item["jobId"] for item in failed["items"]]
    both = await page(client, "status=failed,completed&userId=alice")
    assert [bad, ok] == [item["jobId"] for item in both["items"]]
    repeated = await page(client, "status=failed&status=completed&userId=bob")
    assert [other] == [item["jobId"] for item in repeated["items"]]


async def test_items_are_full_job_resources(client: TestClient[Any, Any]) -> None:
    """Each item is the job resource the status route returns."""
    job_id = await initiate(client, [70000, 70007])
    status = await finished(client, job_id)
    item = (await page(client, "limit=1"))["items"][0]
    assert status["jobId"] == item["jobId"]
    assert status["status"] == item["status"]
    assert status["result"]["sha256"] == item["result"]["sha256"]
    assert item["downloadUrl"]


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=101", "limit=ten", "status=done", "cursor=not-a-cursor", "user_id=x"],
)
async def test_bad_query_is_400_problem(client: TestClient[Any, Any], query: str) -> None:
    """A bad limit, status, cursor or unknown parameter is a 400 problem."""
    response = await client.get(f"/v1/download/history?{query}")
    assert 400 == response.status
    assert "application/problem+json" == response.content_type
