"""The job engine through a real app: retries, time limits, cancel, TTL, priority, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate, test_settings, wait_for

from longdl import exceptions
from longdl.app import create_app
from longdl.engine import Artifact, ChangeHub, JobContext
from longdl.models import Job, JobStatus, Priority
from longdl.storage import LocalStorage
from longdl.testing import FlakyStorage
from longdl.web import keys


class Gate:
    """A job kind that runs until the test releases it, recording what ran."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running = 0
        self.peak_running = 0
        self.release = asyncio.Event()
        self.changed = asyncio.Event()

    async def handler(self, ctx: JobContext) -> Artifact:
        self.started.append(ctx.job_id)
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        self.changed.set()
        try:
            ctx.report(percent=50, message="Waiting for the gate")
            await self.release.wait()
        finally:
            self.running -= 1
        info = await ctx.storage.write_bytes(f"bundles/{ctx.job_id}.txt", b"done")
        return Artifact(key=info.key, filename="done.txt", size_bytes=info.size_bytes)

    async def wait_started(self, count: int) -> None:
        async def enough() -> bool:
            return len(self.started) >= count

        await wait_for(enough)


async def submit(client: TestClient[Any, Any], kind: str, **kwargs: Any) -> str:
    inserted = await client.app[keys.ENGINE].submit(kind, {}, **kwargs)
    return inserted.job.id


def flaky_storage(root: Path) -> FlakyStorage:
    """A real local storage that fails only when the test arms it (not while seeding)."""
    return FlakyStorage(LocalStorage(root, b"k" * 32), failures=0, methods=("head",))


async def test_transient_storage_error_is_retried_with_backoff(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """Two transient failures: the job is re-queued twice, waits its backoff, then completes."""
    storage = flaky_storage(tmp_path / "storage")
    client = await make_client(storage=storage, retry_base_ms=200, retry_max_ms=200)
    seen: list[tuple[JobStatus, float, float]] = []
    client.app[keys.ENGINE].hub.add_listener(
        lambda job: seen.append((job.status, time.time(), job.run_after))
    )
    storage.failures = 2

    job_id = await initiate(client, [70000, 70007])
    body = await finished(client, job_id)

    assert "completed" == body["status"]
    assert 3 == body["attempts"]
    assert body["error"] is None
    statuses = [status for status, _, _ in seen]
    assert 2 == sum(1 for a, b in itertools.pairwise(statuses) if (a, b) == ("running", "queued"))
    # The dispatcher never starts a retry before the time its backoff chose.
    for (status, _, run_after), (next_status, started_at, _) in itertools.pairwise(seen):
        if status is JobStatus.QUEUED and next_status is JobStatus.RUNNING and run_after:
            assert started_at >= run_after


async def test_storage_that_stays_down_fails_with_storage_unavailable(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """Transient errors on every attempt: failed, STORAGE_UNAVAILABLE, retryable, attempts used."""
    storage = flaky_storage(tmp_path / "storage")
    client = await make_client(storage=storage, max_attempts=3)
    storage.failures = 100

    body = await finished(client, await initiate(client, [70000]))

    assert "failed" == body["status"]
    assert 3 == body["attempts"] == body["maxAttempts"]
    assert {"code": "STORAGE_UNAVAILABLE", "retryable": True} == {
        key: body["error"][key] for key in ("code", "retryable")
    }


async def test_job_over_its_time_limit_fails_with_timeout(make_client: AppFactory) -> None:
    """A job still running at JOB_TIMEOUT_S fails with TIMEOUT and is not retried."""
    gate = Gate()
    client = await make_client(handlers={"gate": gate.handler}, job_timeout_s=0.3)

    body = await finished(client, await submit(client, "gate"))

    assert "failed" == body["status"]
    assert "TIMEOUT" == body["error"]["code"]
    assert body["error"]["retryable"] is False
    assert 1 == body["attempts"]


async def test_cancel_of_a_queued_job_means_it_never_runs(make_client: AppFactory) -> None:
    """With the only slot busy, a canceled queued job is canceled and never started."""
    gate = Gate()
    client = await make_client(handlers={"gate": gate.handler}, worker_concurrency=1)
    blocker = await submit(client, "gate")
    await gate.wait_started(1)
    queued = await submit(client, "gate")

    response = await client.post(f"/v1/download/cancel/{queued}")
    body = await response.json()
    gate.release.set()
    await finished(client, blocker)

    assert 200 == response.status
    assert "canceled" == body["status"]
    assert "CANCELED" == body["error"]["code"]
    assert [blocker] == gate.started


async def test_delete_cancels_a_running_job(make_client: AppFactory) -> None:
    """DELETE on the result route cancels a running job at once; its result is then 409."""
    gate = Gate()
    client = await make_client(handlers={"gate": gate.handler})
    job_id = await submit(client, "gate")
    await gate.wait_started(1)

    response = await client.delete(f"/v1/download/{job_id}")
    body = await response.json()

    assert 200 == response.status
    assert "canceled" == body["status"]
    assert 0 == gate.running
    result = await client.get(f"/v1/download/{job_id}")
    assert 409 == result.status
    assert "CANCELED" == (await result.json())["code"]


async def test_cancel_of_a_finished_job_is_409(client: TestClient[Any, Any]) -> None:
    """A completed job cannot be canceled; it stays completed."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)

    response = await client.post(f"/v1/download/cancel/{job_id}")

    assert 409 == response.status
    assert "JOB_FINISHED" == (await response.json())["code"]
    status = await (await client.get(f"/v1/download/status/{job_id}")).json()
    assert "completed" == status["status"]


class GatedStorage(FlakyStorage):
    """A real local storage whose reads of one key stall until released."""

    def __init__(self, inner: LocalStorage, stall_key: str) -> None:
        super().__init__(inner, failures=0)
        self.stall_key = stall_key
        self.stalled = asyncio.Event()
        self.release = asyncio.Event()

    async def read(self, key: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        if key == self.stall_key:
            self.stalled.set()
            await self.release.wait()
        async for chunk in self.inner.read(key, chunk_bytes):
            yield chunk


async def test_cancel_while_bundling_removes_the_partial_bundle(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """Canceling mid-bundle leaves no partial file behind in storage."""
    root = tmp_path / "storage"
    storage = GatedStorage(LocalStorage(root, b"k" * 32), "downloads/70007.zip")
    client = await make_client(storage=storage)
    job_id = await initiate(client, [70000, 70007])
    await asyncio.wait_for(storage.stalled.wait(), 10)
    bundles = root / "bundles"
    assert 1 == len(list(bundles.iterdir()))  # the partial bundle being written

    response = await client.post(f"/v1/download/cancel/{job_id}")

    assert "canceled" == (await response.json())["status"]
    assert [] == list(bundles.iterdir())


async def test_ttl_expiry_deletes_the_bundle_and_answers_410(make_client: AppFactory) -> None:
    """After JOB_TTL_S a finished bundle job expires, its bundle is deleted, result is 410."""
    client = await make_client(job_ttl_s=1, sweep_interval_s=0.1)
    job_id = await initiate(client, [70000, 70007])
    await finished(client, job_id)
    bundle = client.app[keys.SETTINGS].storage_dir / "bundles" / f"{job_id}.zip"
    assert bundle.is_file()

    async def expired_and_deleted() -> bool:
        # The sweep expires the row first (a poll may see "expired" then), then empties
        # the trash in the same pass.
        body = await (await client.get(f"/v1/download/status/{job_id}")).json()
        return bool(body["status"] == "expired") and not bundle.exists()

    await wait_for(expired_and_deleted)
    assert 410 == (await client.get(f"/v1/download/{job_id}")).status


async def test_ttl_expiry_never_deletes_a_passed_through_source(make_client: AppFactory) -> None:
    """A single-file job's artifact is the source object: expiry must leave it in place."""
    client = await make_client(job_ttl_s=1, sweep_interval_s=0.1)
    job_id = await initiate(client, [70000])
    await finished(client, job_id)

    async def expired() -> bool:
        body = await (await client.get(f"/v1/download/status/{job_id}")).json()
        return bool(body["status"] == "expired")

    await wait_for(expired)
    source = client.app[keys.SETTINGS].storage_dir / "downloads" / "70000.zip"
    assert source.is_file()


async def test_jobs_are_claimed_by_priority_then_age(make_client: AppFactory) -> None:
    """With one slot, waiting jobs start high first, then normal, then low; ties by age."""
    gate = Gate()
    client = await make_client(handlers={"gate": gate.handler}, worker_concurrency=1)
    blocker = await submit(client, "gate")
    await gate.wait_started(1)
    low = await submit(client, "gate", priority=Priority.LOW)
    normal_1 = await submit(client, "gate")
    high = await submit(client, "gate", priority=Priority.HIGH)
    normal_2 = await submit(client, "gate")

    gate.release.set()
    for job_id in (low, normal_1, high, normal_2):
        await finished(client, job_id)

    assert [blocker, high, normal_1, normal_2, low] == gate.started


async def test_concurrency_is_bounded_by_worker_concurrency(make_client: AppFactory) -> None:
    """Five jobs with two slots: never more than two run at once, and all finish."""
    gate = Gate()
    client = await make_client(handlers={"gate": gate.handler}, worker_concurrency=2)
    job_ids = [await submit(client, "gate") for _ in range(5)]
    await gate.wait_started(2)
    assert 2 == client.app[keys.ENGINE].running_count

    gate.release.set()
    bodies = [await finished(client, job_id) for job_id in job_ids]

    assert ["completed"] * 5 == [body["status"] for body in bodies]
    assert 2 == gate.peak_running


async def noop(ctx: JobContext) -> Artifact:
    return Artifact(key="sources/none", filename="none", size_bytes=0, owned=False)


async def test_a_job_submitted_to_an_idle_engine_starts_in_its_own_insert(
    make_client: AppFactory,
) -> None:
    """An idle dispatcher holds no slot: a job submitted while one is free is claimed by
    its own insert (one transaction), not queued for the dispatcher to claim."""
    client = await make_client(handlers={"noop": noop}, worker_concurrency=1)
    engine = client.app[keys.ENGINE]
    statuses = []
    for _ in range(5):
        inserted = await engine.submit("noop", {})
        statuses.append(inserted.job.status)
        assert "completed" == (await finished(client, inserted.job.id))["status"]

    assert [JobStatus.RUNNING] * 5 == statuses


@pytest.mark.parametrize("turns", range(5))
async def test_a_submit_given_up_on_keeps_no_slot(make_client: AppFactory, turns: int) -> None:
    """A submit cancelled ``turns`` loop turns in (before its insert runs, while it
    commits, after) holds no slot for ever: whatever it committed runs, and then both
    slots take jobs at once. (An insert is offered a claim only with a slot held for
    it, and the slot is given back unless the claim is committed.)"""
    gate = Gate()
    client = await make_client(handlers={"gate": gate.handler}, worker_concurrency=2)
    engine = client.app[keys.ENGINE]
    store = client.app[keys.STORE]

    given_up = asyncio.create_task(engine.submit("gate", {}))
    for _ in range(turns):
        await asyncio.sleep(0)  # one turn of the loop: places the cancel, waits for nothing
    given_up.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await given_up
    gate.release.set()

    async def settled() -> bool:
        counts = await store.count_by_status()
        return not counts.get("queued") and not counts.get("running")

    await wait_for(settled)
    gate.release.clear()
    before = len(gate.started)
    job_ids = [await submit(client, "gate") for _ in range(2)]
    await gate.wait_started(before + 2)
    assert 2 == gate.running
    gate.release.set()
    assert ["completed"] * 2 == [(await finished(client, j))["status"] for j in job_ids]


async def test_jobs_submitted_back_to_back_find_their_slot_free(make_client: AppFactory) -> None:
    """A job's slot is free once its handler returns, not once its final write lands:
    jobs submitted one after another, each faster than the last one's write, still start
    in their own inserts instead of piling up in the queue."""
    client = await make_client(handlers={"noop": noop}, worker_concurrency=2)
    engine = client.app[keys.ENGINE]
    inserted = [await engine.submit("noop", {}) for _ in range(50)]
    bodies = [await finished(client, i.job.id) for i in inserted]

    assert ["completed"] * 50 == [body["status"] for body in bodies]
    started_at_insert = sum(i.job.status is JobStatus.RUNNING for i in inserted)
    assert started_at_insert >= 45, f"{50 - started_at_insert} of 50 went through the queue"


async def test_shutdown_requeues_running_jobs_without_using_an_attempt(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """Stopping the app mid-job re-queues it; a new app on the same data finishes it."""
    data_dir = tmp_path / "shared-data"
    gate = Gate()
    first = await make_client(handlers={"gate": gate.handler}, data_dir=data_dir)
    job_id = await submit(first, "gate")
    await gate.wait_started(1)
    await first.close()

    row = await stored_job(data_dir, job_id)
    assert (JobStatus.QUEUED, 0) == (row.status, row.attempts)

    second_gate = Gate()
    second_gate.release.set()
    second = await make_client(handlers={"gate": second_gate.handler}, data_dir=data_dir)
    body = await finished(second, job_id)
    assert "completed" == body["status"]
    assert 1 == body["attempts"]


async def stored_job(data_dir: Path, job_id: str) -> Job:
    """The job as stored in the SQLite file, read through a fresh store."""
    from longdl.store import SQLiteStore

    store = SQLiteStore(data_dir / "longdl.sqlite3")
    await store.open()
    try:
        job = await store.get_job(job_id)
    finally:
        await store.close()
    assert job is not None
    return job


async def test_progress_reaches_the_database_on_its_cadence(make_client: AppFactory) -> None:
    """A running job's in-memory progress is flushed to SQLite within PROGRESS_FLUSH_MS."""
    gate = Gate()
    client = await make_client(handlers={"gate": gate.handler}, progress_flush_ms=50)
    job_id = await submit(client, "gate")
    await gate.wait_started(1)
    store = client.app[keys.STORE]

    async def flushed() -> bool:
        job = await store.get_job(job_id)
        return job is not None and job.progress.message == "Waiting for the gate"

    await wait_for(flushed)
    gate.release.set()
    await finished(client, job_id)


async def test_final_notification_comes_after_memory_is_cleared(
    client: TestClient[Any, Any],
) -> None:
    """When a job's final status is announced, readers no longer see its running copy."""
    engine = client.app[keys.ENGINE]
    running_at_final: list[int] = []
    engine.hub.add_listener(
        lambda job: running_at_final.append(engine.running_count) if job.status.finished else None
    )
    job_id = await initiate(client, [70000, 70007])

    job = await engine.wait_finished(job_id, 30)

    assert job is not None
    assert JobStatus.COMPLETED == job.status
    assert [0] == running_at_final


async def test_shutdown_answers_waiting_long_polls_at_once(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """A long-poll on an idle job gets its 304 as soon as shutdown begins, rather than
    holding the shutdown up until it is cut off."""
    gate = Gate()
    app = create_app(
        test_settings(tmp_path / "data", worker_concurrency=1), handlers={"gate": gate.handler}
    )
    server = await aiohttp_server(app)
    engine = app[keys.ENGINE]
    await engine.submit("gate", {})
    await gate.wait_started(1)
    idle = (await engine.submit("gate", {})).job.id  # queued behind the busy slot
    url = f"http://127.0.0.1:{server.port}/v1/download/status/{idle}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as first:
            tag = first.headers["ETag"]
        poll = asyncio.create_task(session.get(f"{url}?wait=25", headers={"If-None-Match": tag}))

        async def waiting() -> bool:
            return engine.hub.is_watched(idle)

        await wait_for(waiting)
        shutdown = asyncio.create_task(server.close())
        response = await asyncio.wait_for(poll, 10)
        assert 304 == response.status
        response.release()
        await shutdown
    with pytest.raises(exceptions.Overloaded, match="shutting down"):
        await engine.submit("gate", {})


class Recorder:
    """A job kind that runs until stopped and records why it was stopped."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.reasons: list[str | None] = []

    async def handler(self, ctx: JobContext) -> Artifact:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.reasons.append(ctx.stop_reason)
            raise
        raise AssertionError("unreachable")


async def test_handlers_learn_why_they_are_stopped(make_client: AppFactory, tmp_path: Path) -> None:
    """stop_reason says cancel for a cancel, shutdown for a stop, None for the time limit."""
    recorder = Recorder()
    client = await make_client(handlers={"rec": recorder.handler}, data_dir=tmp_path / "a")
    job_id = await submit(client, "rec")
    await asyncio.wait_for(recorder.started.wait(), 10)
    await client.post(f"/v1/download/cancel/{job_id}")

    recorder.started.clear()
    await submit(client, "rec")
    await asyncio.wait_for(recorder.started.wait(), 10)
    await client.close()

    timed = await make_client(
        handlers={"rec": recorder.handler}, data_dir=tmp_path / "b", job_timeout_s=0.2
    )
    await finished(timed, await submit(timed, "rec"))

    assert ["cancel", "shutdown", None] == recorder.reasons


async def test_watch_keeps_a_change_made_while_its_waiter_was_busy() -> None:
    """A change between two waits (a stream writing a heartbeat) wakes the next wait at once."""
    hub = ChangeHub()
    watch = hub.watch("job")
    assert await watch.wait(0.01) is False
    hub.wake("job")
    assert await asyncio.wait_for(watch.wait(30), 5) is True
    watch.close()


async def test_a_renewed_watch_waits_for_the_next_change() -> None:
    """After a wake-up, renew watches for the change after it: the one it saw no longer
    counts, the next one does, and closing it leaves nothing watched."""
    hub = ChangeHub()
    watch = hub.watch("job")
    hub.wake("job")
    assert await watch.wait(30) is True
    watch.renew()
    assert await watch.wait(0.01) is False
    hub.wake("job")
    assert await asyncio.wait_for(watch.wait(30), 5) is True
    watch.close()
    assert not hub.is_watched("job")


async def test_watch_times_out_at_its_limit() -> None:
    """A wait on a job that does not change answers False once its timeout passed."""
    hub = ChangeHub()
    loop = asyncio.get_running_loop()
    watches = [hub.watch("job") for _ in range(3)]
    started = loop.time()
    results = await asyncio.gather(*(w.wait(0.05 * (i + 1)) for i, w in enumerate(watches)))
    assert [False, False, False] == results
    assert loop.time() - started >= 0.15
    for watch in watches:
        watch.close()
    assert not hub.is_watched("job")


async def test_answered_watches_do_not_pile_up() -> None:
    """Waits answered by a change leave no timeout behind."""
    hub = ChangeHub()
    for _ in range(3 * 1024):
        watch = hub.watch("job")
        waiting = watch.wait(3600)
        hub.wake("job")
        assert await waiting is True
        watch.close()
    assert 0 == len(hub._timeouts)
    assert not hub.is_watched("job")


async def test_drain_wakes_every_watch() -> None:
    """wake_all (the engine's drain) answers every held wait with a change."""
    hub = ChangeHub()
    watches = [hub.watch(f"job-{i}") for i in range(3)]
    waits = [w.wait(3600) for w in watches]
    hub.wake_all()
    assert [True, True, True] == await asyncio.wait_for(asyncio.gather(*waits), 5)


async def test_a_change_listener_that_raises_is_logged_and_the_others_still_hear(
    make_client: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken change listener costs only itself: the job completes, a listener after
    it hears every change, and the failure is logged with its traceback."""
    client = await make_client()
    hub = client.app[keys.ENGINE].hub

    def broken(job: Job) -> None:
        raise RuntimeError("listener bug")

    heard: list[JobStatus] = []
    hub.add_listener(broken)
    hub.add_listener(lambda job: heard.append(job.status))
    body = await finished(client, await initiate(client, [70000]))
    assert "completed" == body["status"]

    async def heard_completed() -> bool:
        # The poll may show the outcome before its write lands and is announced.
        return JobStatus.COMPLETED in heard

    await wait_for(heard_completed)
    failures = [r for r in caplog.records if r.getMessage() == "change listener failed"]
    assert failures and all(r.exc_info is not None for r in failures)
