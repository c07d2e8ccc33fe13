"""/metrics: Prometheus text with job counts, queue depth, durations and HTTP latency."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate, wait_for
from prometheus_client.parser import text_string_to_metric_families


async def scrape(
    client: TestClient[Any, Any],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert 200 == response.status
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_jobs_durations_and_requests(client: TestClient[Any, Any]) -> None:
    """After two jobs finish, their statuses, durations and route latencies are exported."""
    ok = await initiate(client, [70000, 70007])
    bad = await initiate(client, [99999])
    for job_id in (ok, bad):
        await finished(client, job_id)

    samples = await scrape(client)

    assert 1 == samples[("longdl_jobs", (("status", "completed"),))]
    assert 1 == samples[("longdl_jobs", (("status", "failed"),))]
    assert 0 == samples[("longdl_queue_depth", ())]
    assert (
        1
        == samples[
            ("longdl_job_duration_seconds_count", (("kind", "download"), ("status", "completed")))
        ]
    )
    assert 2 == samples[("longdl_job_queue_wait_seconds_count", (("kind", "download"),))]
    status_polls = [
        value
        for (name, labels), value in samples.items()
        if name == "longdl_http_request_duration_seconds_count"
        and ("route", "/v1/download/status/{job_id}") in labels
    ]
    assert sum(status_polls) >= 2
    routes = {
        dict(labels).get("route")
        for name, labels in samples
        if name == "longdl_http_request_duration_seconds_count"
    }
    assert not any(ok in (route or "") for route in routes)  # ids never become labels


async def test_unknown_paths_share_one_label(client: TestClient[Any, Any]) -> None:
    """404s on arbitrary paths are counted under one route label."""
    for path in ("/a", "/b", "/c"):
        await client.get(path)
    samples = await scrape(client)
    key = (
        "longdl_http_request_duration_seconds_count",
        (("method", "GET"), ("route", "unmatched"), ("status", "404")),
    )
    assert 3 == samples[key]


async def test_waiting_requests_count_held_long_polls_and_streams(
    make_client: AppFactory,
) -> None:
    """A long-poll and an event stream held on a waiting job count in
    ``longdl_waiting_requests`` while they wait, and not after they are answered."""
    client = await make_client(
        worker_concurrency=1,
        download_delay_enabled=True,
        download_delay_min_ms=60_000,
        download_delay_max_ms=60_000,
    )
    await initiate(client, [70000])  # runs for a minute: the next one waits behind it
    job_id = await initiate(client, [70007])
    status_url = f"/v1/download/status/{job_id}"
    tag = (await client.get(status_url)).headers["ETag"]
    assert 0 == (await scrape(client))[("longdl_waiting_requests", ())]
    poll = asyncio.ensure_future(
        client.get(f"{status_url}?wait=20", headers={"If-None-Match": tag})
    )
    stream = await client.get(f"/v1/download/{job_id}/events")

    async def both_waiting() -> bool:
        return 2 == (await scrape(client))[("longdl_waiting_requests", ())]

    await wait_for(both_waiting)
    assert 200 == (await client.post(f"/v1/download/cancel/{job_id}")).status
    assert "canceled" == (await (await poll).json())["status"]
    await stream.read()  # the stream ends after the final status
    assert 0 == (await scrape(client))[("longdl_waiting_requests", ())]
