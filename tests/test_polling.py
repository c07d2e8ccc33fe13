"""Polling the status route: ETags, poll hints, long-polls; idempotent initiates."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate, wait_for

from longdl.engine import Artifact, JobContext
from longdl.models import Progress
from longdl.store import NewJob, SQLiteStore
from longdl.web import keys


class Stepper:
    """A job kind that moves its progress only when the test says so."""

    def __init__(self) -> None:
        self.step = asyncio.Event()
        self.done = asyncio.Event()
        self.started = asyncio.Event()
        self.stepped_at = 0.0

    async def handler(self, ctx: JobContext) -> Artifact:
        self.started.set()
        percent = 0.0
        while not self.done.is_set():
            await self.step.wait()
            self.step.clear()
            percent += 10
            self.stepped_at = time.monotonic()
            ctx.report(percent=percent)
        info = await ctx.storage.write_bytes(f"bundles/{ctx.job_id}.txt", b"ok")
        return Artifact(key=info.key, filename="ok.txt", size_bytes=info.size_bytes)


async def stepper_job(make_client: AppFactory, **settings: Any) -> tuple[Any, Stepper, str]:
    stepper = Stepper()
    client = await make_client(handlers={"step": stepper.handler}, **settings)
    inserted = await client.app[keys.ENGINE].submit("step", {})
    await asyncio.wait_for(stepper.started.wait(), 10)
    return client, stepper, inserted.job.id


async def test_status_has_etag_and_304_when_unchanged(client: TestClient[Any, Any]) -> None:
    """A finished job's status carries an ETag; sending it back gets 304 with no body."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)
    first = await client.get(f"/v1/download/status/{job_id}")
    tag = first.headers["ETag"]

    again = await client.get(f"/v1/download/status/{job_id}", headers={"If-None-Match": tag})

    assert "no-cache" == first.headers["Cache-Control"]
    assert 304 == again.status
    assert b"" == await again.read()
    assert tag == again.headers["ETag"]


@pytest.mark.parametrize("form", ["*", "strong", "listed"])
async def test_if_none_match_compares_as_rfc_9110_says(
    client: TestClient[Any, Any], form: str
) -> None:
    """If-None-Match is 304 for ``*``, for the tag without its ``W/`` (the weak
    comparison), and for the tag among others; another tag is a 200."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)
    tag = (await client.get(f"/v1/download/status/{job_id}")).headers["ETag"]
    assert tag.startswith('W/"')
    header = {"*": "*", "strong": tag.removeprefix("W/"), "listed": f'"other", {tag}'}[form]

    matched = await client.get(f"/v1/download/status/{job_id}", headers={"If-None-Match": header})
    other = await client.get(f"/v1/download/status/{job_id}", headers={"If-None-Match": '"x"'})

    assert (304, 200) == (matched.status, other.status)


async def test_a_long_poll_with_if_none_match_star_waits(make_client: AppFactory) -> None:
    """``If-None-Match: *`` names whatever the job is now: the long-poll waits for a
    change (it answered 200 at once) and, with none, ends with 304."""
    client, stepper, job_id = await stepper_job(make_client, long_poll_max_s=0.5)

    response = await client.get(
        f"/v1/download/status/{job_id}?wait=20", headers={"If-None-Match": "*"}
    )

    assert 304 == response.status
    stepper.done.set()
    stepper.step.set()


async def test_unfinished_job_has_poll_hints(make_client: AppFactory) -> None:
    """While a job runs, Retry-After and nextPollInMs tell the client when to come back."""
    client, stepper, job_id = await stepper_job(make_client)
    response = await client.get(f"/v1/download/status/{job_id}")
    body = await response.json()
    assert 1 <= int(response.headers["Retry-After"]) <= 5
    assert 500 <= body["nextPollInMs"] <= 5000
    stepper.done.set()
    stepper.step.set()
    final = await finished(client, job_id)
    assert final["nextPollInMs"] is None


async def test_long_poll_returns_within_100_ms_of_a_progress_change(
    make_client: AppFactory,
) -> None:
    """A ?wait= poll with the current ETag answers as soon as progress moves."""
    client, stepper, job_id = await stepper_job(make_client)
    hub = client.app[keys.ENGINE].hub
    latencies = []
    for _ in range(5):
        current = await client.get(f"/v1/download/status/{job_id}")
        tag = current.headers["ETag"]
        poll = asyncio.create_task(
            client.get(f"/v1/download/status/{job_id}?wait=20", headers={"If-None-Match": tag})
        )

        async def watched() -> bool:
            return hub.is_watched(job_id)

        await wait_for(watched)
        stepper.step.set()
        response = await poll
        latencies.append(time.monotonic() - stepper.stepped_at)
        assert 200 == response.status
        assert tag != response.headers["ETag"]
    stepper.done.set()
    stepper.step.set()
    assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies


async def test_a_wake_up_that_changes_nothing_does_not_end_a_long_poll(
    make_client: AppFactory,
) -> None:
    """A long-poll woken while the job is unchanged (a late notification, a progress
    report that rounds to the same) keeps waiting, and answers the real change."""
    client, stepper, job_id = await stepper_job(make_client)
    engine = client.app[keys.ENGINE]
    tag = (await client.get(f"/v1/download/status/{job_id}")).headers["ETag"]
    poll = asyncio.create_task(
        client.get(f"/v1/download/status/{job_id}?wait=20", headers={"If-None-Match": tag})
    )

    async def watched() -> bool:
        return engine.hub.is_watched(job_id)

    await wait_for(watched)
    engine.hub.notify(await engine.get(job_id))  # a change notice with nothing changed
    await client.get("/health")  # a full round trip: the woken poll has run meanwhile
    still_waiting = not poll.done()
    stepper.step.set()
    response = await poll
    stepper.done.set()
    stepper.step.set()
    assert still_waiting
    assert (200, True) == (response.status, tag != response.headers["ETag"])


async def test_long_poll_returns_at_the_cap_when_nothing_changes(
    make_client: AppFactory,
) -> None:
    """With nothing happening, ?wait=20 returns 304 after LONG_POLL_MAX_S, not 20 s."""
    client, stepper, job_id = await stepper_job(make_client, long_poll_max_s=0.5)
    tag = (await client.get(f"/v1/download/status/{job_id}")).headers["ETag"]

    started = time.monotonic()
    response = await client.get(
        f"/v1/download/status/{job_id}?wait=20", headers={"If-None-Match": tag}
    )
    elapsed_s = time.monotonic() - started

    assert 304 == response.status
    assert 0.45 <= elapsed_s < 5
    stepper.done.set()
    stepper.step.set()


async def test_long_poll_of_a_finished_job_returns_at_once(client: TestClient[Any, Any]) -> None:
    """A finished job never makes a long-poll wait."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)
    started = time.monotonic()
    response = await client.get(f"/v1/download/status/{job_id}?wait=20")
    assert 200 == response.status
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("wait", ["-1", "soon", "nan"])
async def test_bad_wait_is_400(client: TestClient[Any, Any], wait: str) -> None:
    """A negative or non-numeric wait is a 400 problem."""
    job_id = await initiate(client, [70000])
    response = await client.get(f"/v1/download/status/{job_id}?wait={wait}")
    assert 400 == response.status


def job_count(client: TestClient[Any, Any]) -> int:
    with sqlite3.connect(client.app[keys.SETTINGS].database_path) as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


async def test_100_concurrent_initiates_with_one_key_make_one_job(
    client: TestClient[Any, Any],
) -> None:
    """100 identical requests racing with one Idempotency-Key create exactly one job."""
    headers = {"Idempotency-Key": "order-42"}
    responses = await asyncio.gather(
        *(
            client.post("/v1/download/initiate", json={"file_ids": [70000]}, headers=headers)
            for _ in range(100)
        )
    )
    bodies = [await response.json() for response in responses]

    assert [202] * 100 == [response.status for response in responses]
    assert 1 == len({body["jobId"] for body in bodies})
    replayed = [response.headers.get("Idempotent-Replayed") for response in responses]
    assert 99 == replayed.count("true")
    assert 1 == job_count(client)


async def test_same_key_with_another_body_is_422(client: TestClient[Any, Any]) -> None:
    """Reusing a key for a different request is refused and creates nothing."""
    headers = {"Idempotency-Key": "k-1"}
    first = await client.post("/v1/download/initiate", json={"file_ids": [70000]}, headers=headers)
    other = await client.post("/v1/download/initiate", json={"file_ids": [70007]}, headers=headers)
    assert 202 == first.status
    assert 422 == other.status
    assert "IDEMPOTENCY_KEY_REUSED" == (await other.json())["code"]
    assert 1 == job_count(client)


async def test_client_request_id_is_an_idempotency_key(client: TestClient[Any, Any]) -> None:
    """clientRequestId in the body replays like the header does."""
    body = {"file_ids": [70000, 70007], "clientRequestId": "ui-7"}
    first = await (await client.post("/v1/download/initiate", json=body)).json()
    again = await client.post("/v1/download/initiate", json=body)
    assert first["jobId"] == (await again.json())["jobId"]
    assert "true" == again.headers["Idempotent-Replayed"]


async def test_replay_of_a_finished_job_is_still_202(client: TestClient[Any, Any]) -> None:
    """A replay answers like the first request did, even after the job finished."""
    headers = {"Idempotency-Key": "k-2"}
    first = await client.post("/v1/download/initiate", json={"file_ids": [70000]}, headers=headers)
    job_id = (await first.json())["jobId"]
    await finished(client, job_id)
    again = await client.post("/v1/download/initiate", json={"file_ids": [70000]}, headers=headers)
    assert 202 == again.status
    assert job_id == (await again.json())["jobId"]


async def test_idempotency_keys_are_kept_24_hours(tmp_path: Path) -> None:
    """A key older than 24 h no longer replays: the same key makes a new job."""
    now = [1_000_000.0]
    store = SQLiteStore(tmp_path / "db.sqlite3", clock=lambda: now[0])
    await store.open()
    try:

        def new_job(job_id: str) -> NewJob:
            return NewJob(id=job_id, kind="download", payload={}, max_attempts=3)

        first = await store.insert_job(new_job("a"), idempotency_key="k", request_hash="h")
        now[0] += 23 * 3600
        within = await store.insert_job(new_job("b"), idempotency_key="k", request_hash="h")
        now[0] += 2 * 3600
        after = await store.insert_job(new_job("c"), idempotency_key="k", request_hash="h")
    finally:
        await store.close()

    assert (False, "a") == (first.replayed, first.job.id)
    assert (True, "a") == (within.replayed, within.job.id)
    assert (False, "c") == (after.replayed, after.job.id)


async def test_running_job_is_served_from_memory(make_client: AppFactory) -> None:
    """Polls show progress newer than the last flush to SQLite."""
    client, stepper, job_id = await stepper_job(make_client, progress_flush_ms=3_600_000)
    stepper.step.set()

    async def moved() -> dict[str, Any] | None:
        body: dict[str, Any] = await (await client.get(f"/v1/download/status/{job_id}")).json()
        return body if body["progress"]["percent"] == 10 else None

    await wait_for(moved)
    stored = await client.app[keys.STORE].get_job(job_id)
    assert stored is not None
    assert Progress().percent == stored.progress.percent
    stepper.done.set()
    stepper.step.set()
