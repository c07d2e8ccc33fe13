"""``GET /v1/download/{jobId}/events`` through a real app: order, resume, heartbeat, end."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate

from longdl.engine import Artifact, JobContext
from longdl.handlers.download import source_key
from longdl.seed import demo_size_bytes
from longdl.web import keys

LIFECYCLE = ["queued", "running", "processing_artifacts", "completed"]
FINISHED = {"completed", "failed", "canceled", "expired"}


@dataclass
class Message:
    """One SSE message as a browser's EventSource would see it (or a comment)."""

    event: str = "message"
    id: str | None = None
    data: str | None = None
    retry: int | None = None
    comment: str | None = None

    @property
    def job(self) -> dict[str, Any]:
        assert self.data is not None
        body: dict[str, Any] = json.loads(self.data)
        return body


async def next_message(response: ClientResponse, timeout_s: float = 10.0) -> Message | None:
    """The next message or comment of the stream; None once the server closed it."""
    message = Message()
    has_field = False
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await response.content.readline()
            if not raw:
                return message if has_field else None
            line = raw.decode().rstrip("\r\n")
            if not line:
                if has_field:
                    return message
                continue
            if line.startswith(":"):
                return Message(event="", comment=line[1:].strip())
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            has_field = True
            if name == "event":
                message.event = value
            elif name == "id":
                message.id = value
            elif name == "data":
                message.data = value if message.data is None else f"{message.data}\n{value}"
            elif name == "retry":
                message.retry = int(value)


async def all_messages(response: ClientResponse, timeout_s: float = 20.0) -> list[Message]:
    """Every message until the server closes the stream (failing after ``timeout_s``)."""
    messages = []
    async with asyncio.timeout(timeout_s):
        while (message := await next_message(response, timeout_s)) is not None:
            messages.append(message)
    return messages


async def next_event(response: ClientResponse, timeout_s: float = 10.0) -> Message | None:
    """The next message carrying an event (skipping retry hints and comments)."""
    while True:
        message = await next_message(response, timeout_s)
        if message is None or message.data is not None:
            return message


class Steps:
    """A job kind the test drives: ``advance(p)`` reports ``p`` percent, ``finish()`` ends it."""

    def __init__(self) -> None:
        self.orders: asyncio.Queue[float | None] = asyncio.Queue()

    async def handler(self, ctx: JobContext) -> Artifact:
        ctx.report(percent=1, message="Waiting for the test")
        while (percent := await self.orders.get()) is not None:
            ctx.report(percent=percent, message=f"At {percent:g}%")
        return Artifact(
            key=source_key(70000),
            filename="70000.zip",
            size_bytes=demo_size_bytes(70000),
            owned=False,
        )

    def advance(self, percent: float) -> None:
        self.orders.put_nowait(percent)

    def finish(self) -> None:
        self.orders.put_nowait(None)


async def steps_client(
    make_client: AppFactory, **overrides: Any
) -> tuple[TestClient[Any, Any], Steps]:
    steps = Steps()
    client = await make_client(handlers={"steps": steps.handler}, **overrides)
    return client, steps


async def submit_steps(client: TestClient[Any, Any]) -> str:
    inserted = await client.app[keys.ENGINE].submit("steps", {"file_ids": [70000]})
    return inserted.job.id


async def running(client: TestClient[Any, Any], job_id: str) -> None:
    """Wait until the job's handler started."""
    engine = client.app[keys.ENGINE]
    async with asyncio.timeout(10):
        while True:
            changed = engine.hub.event(job_id)
            job = await engine.get(job_id)
            if job is not None and job.progress.message == "Waiting for the test":
                return
            await changed.wait()


def events_url(job_id: str) -> str:
    return f"/v1/download/{job_id}/events"


# --- the stream ------------------------------------------------------------------------


async def test_stream_headers_keep_proxies_from_buffering(make_client: AppFactory) -> None:
    """The stream is text/event-stream, uncached, untransformed and unbuffered by nginx."""
    client, steps = await steps_client(make_client)
    job_id = await submit_steps(client)
    async with client.get(events_url(job_id)) as response:
        assert 200 == response.status
        assert "text/event-stream" == response.headers["Content-Type"]
        assert "no-cache, no-transform" == response.headers["Cache-Control"]
        assert "no" == response.headers["X-Accel-Buffering"]
        assert response.headers["X-Request-ID"]
    steps.finish()


async def test_stream_opens_with_retry_hint_and_the_status_snapshot(
    make_client: AppFactory,
) -> None:
    """The first event is a snapshot equal to the status route's body, after a retry hint."""
    client, steps = await steps_client(make_client, worker_concurrency=1)
    await submit_steps(client)  # occupies the only worker, so the next job stays queued
    job_id = await submit_steps(client)
    status_body = await (await client.get(f"/v1/download/status/{job_id}")).json()
    async with client.get(events_url(job_id)) as response:
        hint = await next_message(response)
        snapshot = await next_message(response)
    assert hint is not None and snapshot is not None
    assert 1000 == hint.retry
    assert "snapshot" == snapshot.event
    assert status_body == snapshot.job
    steps.finish()


async def test_events_follow_the_job_to_its_terminal_status_then_close(
    make_client: AppFactory,
) -> None:
    """Snapshot first, then progress/status events with increasing ids; completed last; EOF."""
    client = await make_client(
        download_delay_enabled=True, download_delay_min_ms=300, download_delay_max_ms=300
    )
    job_id = await initiate(client, [70000, 70007, 70014])
    async with client.get(events_url(job_id)) as response:
        messages = [m for m in await all_messages(response) if m.data is not None]

    assert "snapshot" == messages[0].event
    ids = [int(m.id or 0) for m in messages]
    assert sorted(set(ids)) == ids
    statuses = [m.job["status"] for m in messages]
    positions = [LIFECYCLE.index(s) for s in statuses]
    assert sorted(positions) == positions
    assert ["completed"] == [s for s in statuses if s in FINISHED]
    assert "completed" == statuses[-1]
    for previous, message in itertools.pairwise(messages):
        changed = message.job["status"] != previous.job["status"]
        assert ("status" if changed else "progress") == message.event
    assert {"progress", "status"} <= {m.event for m in messages}


async def test_finished_job_stream_ends_right_after_its_snapshot(
    client: TestClient[Any, Any],
) -> None:
    """A finished job gets one snapshot with its final state and the stream closes."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)
    async with client.get(events_url(job_id)) as response:
        messages = [m for m in await all_messages(response) if m.data is not None]
    assert ["snapshot"] == [m.event for m in messages]
    assert "completed" == messages[0].job["status"]
    assert messages[0].job["downloadUrl"]


async def test_canceling_ends_the_stream_with_a_canceled_status_event(
    make_client: AppFactory,
) -> None:
    """A job canceled while a client watches ends its stream with a canceled status event."""
    client, _ = await steps_client(make_client)
    job_id = await submit_steps(client)
    await running(client, job_id)
    async with client.get(events_url(job_id)) as response:
        snapshot = await next_event(response)
        assert snapshot is not None and "running" == snapshot.job["status"]
        assert 200 == (await client.post(f"/v1/download/cancel/{job_id}")).status
        rest = [m for m in await all_messages(response) if m.data is not None]
    assert ("status", "canceled") == (rest[-1].event, rest[-1].job["status"])


# --- resume ----------------------------------------------------------------------------


async def test_resume_with_nothing_changed_sends_no_second_snapshot(
    make_client: AppFactory,
) -> None:
    """Reconnecting with the last event id of an unchanged job gets heartbeats, not a snapshot."""
    client, steps = await steps_client(make_client, sse_heartbeat_s=0.2)
    job_id = await submit_steps(client)
    await running(client, job_id)
    async with client.get(events_url(job_id)) as response:
        snapshot = await next_event(response)
    assert snapshot is not None and snapshot.id is not None

    headers = {"Last-Event-ID": snapshot.id}
    async with client.get(events_url(job_id), headers=headers) as response:
        await next_message(response)  # the retry hint
        after_resume = await next_message(response)
    assert after_resume is not None
    assert ("", "ping") == (after_resume.event, after_resume.comment)
    steps.finish()


async def test_resume_after_a_change_sends_a_fresh_snapshot(make_client: AppFactory) -> None:
    """Reconnecting after the job moved on sends the current state with a larger id."""
    client, steps = await steps_client(make_client)
    job_id = await submit_steps(client)
    await running(client, job_id)
    async with client.get(events_url(job_id)) as response:
        first = await next_event(response)
    assert first is not None and first.id is not None
    steps.advance(40)
    await wait_percent(client, job_id, 40)

    async with client.get(events_url(job_id), headers={"Last-Event-ID": first.id}) as response:
        fresh = await next_event(response)
    assert fresh is not None and fresh.id is not None
    assert ("snapshot", 40) == (fresh.event, fresh.job["progress"]["percent"])
    assert int(fresh.id) > int(first.id)
    steps.finish()


async def test_last_event_id_query_parameter_resumes_like_the_header(
    make_client: AppFactory,
) -> None:
    """``?lastEventId=`` (for clients that cannot set headers) also skips the unchanged snapshot."""
    client, steps = await steps_client(make_client, sse_heartbeat_s=0.2)
    job_id = await submit_steps(client)
    await running(client, job_id)
    async with client.get(events_url(job_id)) as response:
        snapshot = await next_event(response)
    assert snapshot is not None

    async with client.get(events_url(job_id), params={"lastEventId": snapshot.id}) as response:
        await next_message(response)
        after_resume = await next_message(response)
    assert after_resume is not None and "ping" == after_resume.comment
    steps.finish()


async def test_ids_keep_increasing_across_a_reconnect(make_client: AppFactory) -> None:
    """Events after a resume carry ids larger than the one the client resumed from."""
    client, steps = await steps_client(make_client)
    job_id = await submit_steps(client)
    await running(client, job_id)
    async with client.get(events_url(job_id)) as response:
        first = await next_event(response)
    assert first is not None and first.id is not None

    async with client.get(events_url(job_id), headers={"Last-Event-ID": first.id}) as response:
        steps.advance(50)
        steps.finish()
        later = [m for m in await all_messages(response) if m.data is not None]
    assert [] != later
    assert all(int(m.id or 0) > int(first.id) for m in later)
    assert "completed" == later[-1].job["status"]


async def test_reconnect_after_the_end_still_gets_the_outcome(client: TestClient[Any, Any]) -> None:
    """A finished job's snapshot is sent even when Last-Event-ID already covers it."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)
    async with client.get(events_url(job_id)) as response:
        first = await next_event(response)
    assert first is not None and first.id is not None

    async with client.get(events_url(job_id), headers={"Last-Event-ID": first.id}) as response:
        again = [m for m in await all_messages(response) if m.data is not None]
    assert [("snapshot", "completed")] == [(m.event, m.job["status"]) for m in again]


async def test_resuming_from_the_largest_id_gets_ids_it_can_resume_from(
    client: TestClient[Any, Any],
) -> None:
    """Resumed from 9999999999999999999 (19 digits, the most an id has), a stream sends
    no id past it: it sent 10000000000000000000, which it then refused as a Last-Event-ID."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)
    largest = "9" * 19

    async with client.get(events_url(job_id), headers={"Last-Event-ID": largest}) as response:
        sent = [m for m in await all_messages(response) if m.data is not None]
    assert [largest] == [m.id for m in sent]
    async with client.get(events_url(job_id), headers={"Last-Event-ID": sent[0].id}) as again:
        assert 200 == again.status


# --- idle streams and limits ----------------------------------------------------------


async def test_idle_stream_sends_heartbeat_comments(make_client: AppFactory) -> None:
    """A queued job that cannot start yet gets ``: ping`` comments and no events."""
    client, steps = await steps_client(make_client, worker_concurrency=1, sse_heartbeat_s=0.1)
    await submit_steps(client)
    job_id = await submit_steps(client)
    async with client.get(events_url(job_id)) as response:
        snapshot = await next_event(response)
        following = [await next_message(response) for _ in range(3)]
    assert snapshot is not None and "queued" == snapshot.job["status"]
    assert ["ping"] * 3 == [m.comment if m else None for m in following]
    steps.finish()


async def test_stream_ends_at_its_lifetime_cap_while_the_job_runs(
    make_client: AppFactory,
) -> None:
    """After ``sse_max_s`` the server closes the stream, though the job has not finished."""
    client, steps = await steps_client(make_client, sse_max_s=0.3)
    job_id = await submit_steps(client)
    async with client.get(events_url(job_id)) as response:
        messages = await all_messages(response, timeout_s=10)
    job = await client.app[keys.ENGINE].get(job_id)
    assert job is not None and not job.status.finished
    assert "snapshot" == next(m for m in messages if m.data is not None).event
    steps.finish()


async def test_shutdown_closes_open_streams(make_client: AppFactory) -> None:
    """Stopping the app ends open streams at once instead of holding the shutdown up."""
    client, _ = await steps_client(make_client)
    job_id = await submit_steps(client)
    await running(client, job_id)
    async with client.get(events_url(job_id)) as response:
        await next_event(response)
        closing = asyncio.create_task(client.server.close(), name="test server close")
        done, _ = await asyncio.wait({closing}, timeout=10)
        rest = await all_messages(response, timeout_s=5)
    assert {closing} == done
    assert [] == [m for m in rest if m.data is not None]


# --- errors and routing ----------------------------------------------------------------


async def test_unknown_job_is_404_problem(client: TestClient[Any, Any]) -> None:
    """A job id nobody created answers 404 problem+json, not an empty stream."""
    for job_id in ("00000000-0000-4000-8000-000000000000", "not-a-job"):
        response = await client.get(events_url(job_id))
        assert (404, "application/problem+json") == (response.status, response.content_type)
        assert "JOB_NOT_FOUND" == (await response.json())["code"]


@pytest.mark.parametrize(
    ("header", "query"),
    [("abc", None), (None, "abc"), ("5", "abc"), ("abc", "5")],
    ids=["header", "query", "query-beside-a-good-header", "header-beside-a-good-query"],
)
async def test_malformed_last_event_id_is_400_problem(
    make_client: AppFactory, header: str | None, query: str | None
) -> None:
    """A Last-Event-ID this service never sent is refused with a clear problem, in the
    header or the query, even when the other one is good (the header wins, but the
    request is malformed all the same)."""
    client, steps = await steps_client(make_client)
    job_id = await submit_steps(client)
    response = await client.get(
        events_url(job_id),
        headers={"Last-Event-ID": header} if header is not None else {},
        params={"lastEventId": query} if query is not None else {},
    )
    assert (400, "application/problem+json") == (response.status, response.content_type)
    assert "Last-Event-ID" in (await response.json())["detail"]
    steps.finish()


async def test_events_route_is_not_shadowed_by_the_result_route(
    make_client: AppFactory,
) -> None:
    """``/{id}/events`` streams while ``/{id}`` still answers the result route's 202."""
    client, steps = await steps_client(make_client)
    job_id = await submit_steps(client)
    result = await client.get(f"/v1/download/{job_id}")
    async with client.get(events_url(job_id)) as events:
        events_type = events.headers["Content-Type"]
    assert (202, "application/json") == (result.status, result.content_type)
    assert "text/event-stream" == events_type
    steps.finish()


async def wait_percent(client: TestClient[Any, Any], job_id: str, percent: float) -> None:
    engine = client.app[keys.ENGINE]
    async with asyncio.timeout(10):
        while True:
            changed = engine.hub.event(job_id)
            job = await engine.get(job_id)
            if job is not None and job.progress.percent >= percent:
                return
            await changed.wait()
