"""A job lifecycle that cannot wedge, stall or leak, through real apps on real SQLite.

Each test here is one of the defects of the lifecycle issue: a final write that failed
once, a cancel landing as the bundle is renamed into place, a sweep that fell behind,
an artifact deleted before its row said so, costs that grew with the table, a cancel
made by another process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AppFactory, finished, wait_for
from store_contract import new_job

from longdl.engine import Artifact, JobContext
from longdl.models import JobStatus, Progress
from longdl.store import Limits, SQLiteStore, WorkerInfo
from longdl.web import keys


class HeldLock:
    """Another connection holding a database's write lock while the test says so."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._hold)

    def _hold(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        self._held.set()
        self._release.wait(60)
        conn.execute("ROLLBACK")
        conn.close()

    def __enter__(self) -> HeldLock:
        self._thread.start()
        self._held.wait(10)
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join()

    def __exit__(self, *exc: object) -> None:
        self.release()


class Writer:
    """A job kind that writes its artifact, then waits for the test to let it return."""

    def __init__(self) -> None:
        self.written = asyncio.Event()
        self.go = asyncio.Event()

    async def handler(self, ctx: JobContext) -> Artifact:
        info = await ctx.storage.write_bytes(f"bundles/{ctx.job_id}.txt", b"done")
        self.written.set()
        await self.go.wait()
        return Artifact(key=info.key, filename="done.txt", size_bytes=info.size_bytes)


class WriteAfterGate:
    """A job kind that waits for the test, then makes a write a running job makes on its
    way: entering the artifact phase (``status``) or noting the bundle it is about to
    write (``output``; the status write notes its bundle after), or the same from a task
    of a TaskGroup (``output_in_task``)."""

    def __init__(self, write: str) -> None:
        self.write = write
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        self.runs = 0
        self.went_on = False

    async def handler(self, ctx: JobContext) -> Artifact:
        self.runs += 1
        self.started.set()
        await self.go.wait()
        if self.write == "status":
            await ctx.set_status(JobStatus.PROCESSING_ARTIFACTS)
        key = f"bundles/{ctx.job_id}.txt"
        if self.write == "output_in_task":
            async with asyncio.TaskGroup() as group:
                written = group.create_task(ctx.storage.write_bytes(key, b"done"))
            self.went_on = True
            info = written.result()
        else:
            info = await ctx.storage.write_bytes(key, b"done")
        return Artifact(key=info.key, filename="done.txt", size_bytes=info.size_bytes)


def write_failed(caplog: pytest.LogCaptureFixture) -> Callable[[], Awaitable[bool]]:
    """A probe: has a running job's write met the unavailable database (the job waits,
    or the attempt failed and the write queueing its retry waits)?"""

    async def probe() -> bool:
        return any(
            "job.write_waiting" in r.getMessage() or "job.final_write_failed" in r.getMessage()
            for r in caplog.records
        )

    return probe


async def submit(client: Any, kind: str) -> str:
    return str((await client.app[keys.ENGINE].submit(kind, {})).job.id)


async def job_at_gate(
    make_client: AppFactory, write: str, **settings: Any
) -> tuple[WriteAfterGate, Any, str]:
    """A fresh app with a :class:`WriteAfterGate` job of ``write``, started and waiting at
    its gate; ``settings`` override the app's."""
    job = WriteAfterGate(write)
    client = await make_client(handlers={"w": job.handler}, **settings)
    job_id = await submit(client, "w")
    await asyncio.wait_for(job.started.wait(), 10)
    return job, client, job_id


async def cancel_from_another_process(client: Any, job_id: str) -> None:
    """Cancel the job through a store of its own on the app's database, as another
    process would: the app hears of it only through the database."""
    other = SQLiteStore(client.app[keys.SETTINGS].database_path)
    await other.open()
    try:
        await other.cancel(job_id, ttl_s=60, message="Canceled")
    finally:
        await other.close()


async def status_of(client: Any, job_id: str) -> str:
    return str((await (await client.get(f"/v1/download/status/{job_id}")).json())["status"])


async def test_a_final_write_that_fails_is_retried_until_it_lands(
    make_client: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The completion write fails while another process holds the database: the job
    shows completed from memory meanwhile and is stored completed once the lock goes,
    instead of staying running forever."""
    caplog.set_level(logging.WARNING, logger="longdl.engine")
    writer = Writer()
    client = await make_client(handlers={"w": writer.handler}, db_busy_timeout_ms=100)
    job_id = await submit(client, "w")
    await asyncio.wait_for(writer.written.wait(), 10)
    store = client.app[keys.STORE]

    with HeldLock(client.app[keys.SETTINGS].database_path):
        writer.go.set()

        async def write_failed() -> bool:
            return any("job.final_write_failed" in r.getMessage() for r in caplog.records)

        await wait_for(write_failed)
        assert "completed" == await status_of(client, job_id)
        stored = await store.get_job(job_id)
        assert stored is not None
        assert JobStatus.RUNNING == stored.status

    async def landed() -> bool:
        job = await store.get_job(job_id)
        return job is not None and job.status is JobStatus.COMPLETED

    await wait_for(landed)
    assert "completed" == (await finished(client, job_id))["status"]


@pytest.mark.parametrize("write", ["status", "output"])
async def test_a_running_job_waits_out_a_locked_database_instead_of_retrying(
    make_client: AppFactory, caplog: pytest.LogCaptureFixture, write: str
) -> None:
    """Another process holds the write lock just as a running job enters its artifact
    phase or notes its bundle: the job waits where it is and completes once the lock
    goes, on its first attempt, instead of failing the attempt and starting over."""
    caplog.set_level(logging.WARNING, logger="longdl.engine")
    job, client, job_id = await job_at_gate(make_client, write, db_busy_timeout_ms=100)

    with HeldLock(client.app[keys.SETTINGS].database_path):
        job.go.set()
        await wait_for(write_failed(caplog))
        assert "running" == await status_of(client, job_id)

    body = await finished(client, job_id)
    assert ("completed", 1, 1) == (body["status"], body["attempts"], job.runs), body


async def test_a_running_job_waits_for_the_database_no_longer_than_its_time_limit(
    make_client: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A job waiting for a locked database still ends at JOB_TIMEOUT_S, failed with
    TIMEOUT once the lock goes, rather than waiting forever."""
    caplog.set_level(logging.WARNING, logger="longdl.engine")
    job, client, job_id = await job_at_gate(
        make_client, "output", db_busy_timeout_ms=100, job_timeout_s=1
    )

    with HeldLock(client.app[keys.SETTINGS].database_path):
        job.go.set()

        async def timed_out() -> bool:
            return any("job.failed" in r.getMessage() for r in caplog.records)

        await wait_for(timed_out)

    body = await finished(client, job_id)
    assert ("failed", "TIMEOUT", 1) == (body["status"], body["error"]["code"], job.runs), body


async def test_a_job_waiting_for_the_database_can_be_canceled(
    make_client: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancel reaches a job while it waits for a locked database: the job stops there
    (no bundle written, no attempt used), and the cancel answers once its write lands."""
    caplog.set_level(logging.INFO, logger="longdl.engine")
    job, client, job_id = await job_at_gate(make_client, "output", db_busy_timeout_ms=100)

    with HeldLock(client.app[keys.SETTINGS].database_path):
        job.go.set()
        await wait_for(write_failed(caplog))
        cancel = asyncio.ensure_future(client.post(f"/v1/download/cancel/{job_id}"))

        async def stopped() -> bool:
            return any("job.canceled" in r.getMessage() for r in caplog.records)

        await wait_for(stopped)

    response = await asyncio.wait_for(cancel, 10)
    assert 200 == response.status, await response.text()
    body = await finished(client, job_id)
    assert ("canceled", 1, 1) == (body["status"], body["attempts"], job.runs), body
    assert None is await client.app[keys.STORAGE].head(f"bundles/{job_id}.txt")


class LateCancel:
    """A job kind whose last chunk asks for its own cancel, so the cancel lands while the
    bundle is being renamed into place."""

    def __init__(self) -> None:
        self.key = ""

    async def handler(self, ctx: JobContext) -> Artifact:
        engine_cancel = ctx._engine.cancel  # the same call the cancel route makes
        self.key = f"bundles/{ctx.job_id}.zip"
        loop = asyncio.get_running_loop()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"x" * 1024
            loop.call_soon(lambda: asyncio.ensure_future(engine_cancel(ctx.job_id)))

        info = await ctx.storage.write(self.key, chunks())
        return Artifact(key=info.key, filename="b.zip", size_bytes=info.size_bytes)


async def test_a_cancel_during_the_rename_leaves_no_bundle(make_client: AppFactory) -> None:
    """A cancel that lands as the finished bundle is renamed into place leaves no bundle
    behind and no part file."""
    late = LateCancel()
    client = await make_client(handlers={"late": late.handler})
    job_id = await submit(client, "late")
    body = await finished(client, job_id)
    bundles = client.app[keys.SETTINGS].storage_dir / "bundles"
    assert "canceled" == body["status"]
    assert [] == sorted(p.name for p in bundles.iterdir())


def seed_finished_jobs(db: Path, storage: Path, count: int, expired_ago_s: float) -> list[str]:
    """Write ``count`` completed jobs with bundles, already past their TTL."""
    now = time.time()
    ids = [str(uuid.uuid4()) for _ in range(count)]
    (storage / "bundles").mkdir(parents=True, exist_ok=True)
    rows = []
    for job_id in ids:
        key = f"bundles/{job_id}.zip"
        (storage / key).write_bytes(b"PK")
        result = {"key": key, "filename": "b.zip", "size_bytes": 2, "owned": True}
        rows.append((job_id, json.dumps(result), now - 100, now - expired_ago_s))
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO jobs (id, kind, status, priority, payload, attempts, max_attempts, "
            "progress, result, created_at, updated_at, finished_at, expires_at, client) "
            "VALUES (?, 'download', 'completed', 1, '{}', 1, 3, '{}', ?, ?, ?, ?, ?, 'c')",
            [(i, r, c, c, c, e) for i, r, c, e in rows],
        )
    return ids


async def test_one_sweep_expires_every_job_due(make_client: AppFactory) -> None:
    """5,000 jobs due at once are all expired, their bundles deleted, by one sweep
    (a sweep that stops at a fixed batch falls behind as completions pile up)."""
    client = await make_client()
    settings = client.app[keys.SETTINGS]
    ids = seed_finished_jobs(settings.database_path, settings.storage_dir, 5000, 10)

    expired = await client.app[keys.ENGINE].sweep()

    counts = await client.app[keys.STORE].count_by_status()
    assert (5000, 5000, 0) == (expired, counts[JobStatus.EXPIRED], counts[JobStatus.COMPLETED])
    assert [] == list((settings.storage_dir / "bundles").iterdir())
    assert 410 == (await client.get(f"/v1/download/{ids[0]}")).status


async def test_a_job_is_expired_before_its_bundle_is_deleted(make_client: AppFactory) -> None:
    """Between expiry and deletion the result route already answers 410, never a 302 to
    an object that is about to disappear."""
    client = await make_client()
    settings = client.app[keys.SETTINGS]
    (job_id,) = seed_finished_jobs(settings.database_path, settings.storage_dir, 1, 10)
    bundle = settings.storage_dir / "bundles" / f"{job_id}.zip"

    await client.app[keys.STORE].expire_due(limit=10)
    assert (410, True) == ((await client.get(f"/v1/download/{job_id}")).status, bundle.exists())
    await client.app[keys.ENGINE].empty_trash()
    assert not bundle.exists()


async def test_db_synchronous_full_reaches_the_database(make_client: AppFactory) -> None:
    """DB_SYNCHRONOUS=full makes the app's writes fsync every commit."""
    client = await make_client(db_synchronous="full")
    assert 2 == await client.app[keys.STORE].writer_pragma("synchronous")


class Steps:
    """Counts SQLite virtual machine steps on a connection: work, not time."""

    def __init__(self) -> None:
        self.count = 0

    def install(self, conn: sqlite3.Connection) -> None:
        def tick() -> int:
            self.count += 1
            return 0

        conn.set_progress_handler(tick, 10)


def seed_queued(db: Path, count: int) -> None:
    now = time.time()
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO jobs (id, kind, status, priority, payload, max_attempts, progress, "
            "created_at, updated_at, run_after, client) "
            "VALUES (?, 'download', 'queued', 1, '{}', 3, '{}', ?, ?, ?, 'c')",
            [(str(uuid.uuid4()), now, now, now) for _ in range(count)],
        )


async def test_initiate_costs_the_same_with_20000_jobs_waiting(tmp_path: Path) -> None:
    """An insert with its limit checks does as much database work with 20,000 jobs
    waiting (from the same caller) as with none: the counts are kept, not counted."""
    steps = Steps()
    store = SQLiteStore(tmp_path / "longdl.sqlite3", on_connect=steps.install)
    await store.open()
    limits = Limits(max_queued=1_000_000, max_active_per_client=1_000_000)
    try:

        async def cost() -> float:
            before = steps.count
            for _ in range(20):
                await store.insert_job(new_job(client="c"), limits=limits)
            return (steps.count - before) / 20

        empty = await cost()
        seed_queued(store.path, 20_000)
        full = await cost()
    finally:
        await store.close()
    assert full <= empty * 1.2, (empty, full)


async def test_every_statement_the_writer_runs_uses_an_index(tmp_path: Path) -> None:
    """Whatever the writer runs through a job's whole life (insert with limits and a key,
    claim, heartbeat, output, completion, expiry, purge, trash, webhooks), none of it
    scans a whole table: EXPLAIN QUERY PLAN of each traced statement."""
    traced: list[str] = []
    store = SQLiteStore(
        tmp_path / "longdl.sqlite3",
        on_connect=lambda conn: conn.set_trace_callback(traced.append),
    )
    await store.open()
    traced.clear()  # the migrations ran once; what follows runs all the time
    try:
        limits = Limits(max_queued=100, max_active_per_client=100)
        hook = new_job(callback_url="https://h.example/")
        job_id = (await store.insert_job(hook, idempotency_key="k", limits=limits)).job.id
        await store.register_worker(WorkerInfo("w", "host", 1))
        await store.claim("w", 30, 4)
        await store.heartbeat("w", 30, {job_id: Progress(percent=5)})
        await store.add_output(job_id, "w", "bundles/x.zip")
        await store.set_status(job_id, "w", JobStatus.PROCESSING_ARTIFACTS, Progress())
        await store.complete(job_id, "w", {"key": "bundles/x.zip", "owned": True}, Progress(), 0)
        (delivery,) = await store.claim_webhook_deliveries("w", 4, 30)
        await store.set_webhook_payload(delivery.id, "{}")
        await store.record_webhook_attempt(delivery.id, "delivered", attempted=True)
        await store.rescue_stalled(max_stalls=2, ttl_s=60, exclude_worker="w")
        await store.expire_due(10)
        await store.trash_done([item.key for item in await store.claim_trash(10, 60)])
        await store.purge(0, 10)
        await store.unregister_worker("w")
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "longdl.sqlite3")
    statements = {
        s
        for s in traced
        if s.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT", "DELETE"))
        and "FROM workers" not in s  # one row per process
        and "FROM job_counts" not in s  # one row per status
    }
    scans = [
        (statement, detail)
        for statement in statements
        for *_, detail in conn.execute(f"EXPLAIN QUERY PLAN {statement}")
        if detail.startswith("SCAN ") and " USING " not in detail and "VIRTUAL TABLE" not in detail
    ]
    assert [] == scans
    assert len(statements) > 15


async def test_a_cancel_made_by_another_process_stops_the_job(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """A job canceled through another process's store is stopped here at the next
    heartbeat, as a cancel (its handler cleans up for good)."""
    reasons: list[str | None] = []
    started = asyncio.Event()

    async def handler(ctx: JobContext) -> Artifact:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            reasons.append(ctx.stop_reason)
            raise
        raise AssertionError("unreachable")

    client = await make_client(handlers={"h": handler}, progress_flush_ms=50)
    job_id = await submit(client, "h")
    await asyncio.wait_for(started.wait(), 10)
    await cancel_from_another_process(client, job_id)

    async def stopped() -> bool:
        return bool(reasons)

    await wait_for(stopped)
    assert ["cancel"] == reasons
    assert "canceled" == (await finished(client, job_id))["status"]
    assert 0 == client.app[keys.ENGINE].running_count


@pytest.mark.parametrize("write", ["status", "output", "output_in_task"])
async def test_a_job_canceled_elsewhere_writes_no_bundle_before_it_hears(
    make_client: AppFactory, write: str
) -> None:
    """A job canceled through another process's store, which goes on to enter its
    artifact phase or write its bundle (in its own task or one it started) before its
    heartbeat hears of the cancel, stops there as canceled (never shown failed) and
    writes nothing: the bundle would be noted nowhere, and nothing would ever delete it."""
    # Heartbeats 10 s apart: the write comes long before the next one.
    job, client, job_id = await job_at_gate(make_client, write, progress_flush_ms=60_000)
    await cancel_from_another_process(client, job_id)
    job.go.set()

    assert "canceled" == (await finished(client, job_id))["status"]
    assert None is await client.app[keys.STORAGE].head(f"bundles/{job_id}.txt")
    assert [] == list((client.app[keys.SETTINGS].data_dir / "storage").rglob("*.part*"))
    assert (1, False) == (job.runs, job.went_on)


async def test_a_job_taken_over_writes_no_bundle_before_it_hears(make_client: AppFactory) -> None:
    """A job another worker took over (its lease ran out while this process was stalled)
    writes nothing when it goes on: the write finds it no longer held and the job stops
    here quietly, leaving the job to its new holder."""
    job, client, job_id = await job_at_gate(make_client, "output", progress_flush_ms=60_000)
    with sqlite3.connect(client.app[keys.SETTINGS].database_path) as conn:
        conn.execute("UPDATE jobs SET worker_id = 'another' WHERE id = ?", (job_id,))
    job.go.set()

    engine = client.app[keys.ENGINE]

    async def stopped() -> bool:
        return engine.running_count == 0

    await wait_for(stopped)
    stored = await client.app[keys.STORE].get_job(job_id)
    assert stored is not None
    assert JobStatus.RUNNING == stored.status  # the new holder's, untouched
    assert None is await client.app[keys.STORAGE].head(f"bundles/{job_id}.txt")
    assert (1, False) == (job.runs, job.went_on)


async def test_a_stalled_writer_waking_late_cannot_touch_the_result_of_its_takeover(
    make_client: AppFactory,
) -> None:
    """A bundle written by the run that took a job over (after a stall) survives what
    the stalled run does with its own bundle when it wakes: rename it into place, or
    undo that rename, before it hears it lost the job. (Both runs wrote
    bundles/{job_id}.zip: a chaos run found the completed job's file gone, 8 of 8.)"""
    hold = asyncio.Event()

    async def blocker(ctx: JobContext) -> Artifact:
        await hold.wait()
        return Artifact(key="sources/none", filename="none", size_bytes=0, owned=False)

    client = await make_client(handlers={"block": blocker}, worker_concurrency=1)
    await submit(client, "block")
    response = await client.post("/v1/download/initiate", json={"file_ids": [70000, 70007]})
    job_id = (await response.json())["jobId"]
    # Taken over once: what a rescue of the stalled (or dead) first run leaves.
    with sqlite3.connect(client.app[keys.SETTINGS].database_path) as conn:
        conn.execute("UPDATE jobs SET stalls = 1 WHERE id = ?", (job_id,))
    hold.set()
    body = await finished(client, job_id)
    assert "completed" == body["status"]

    stale = client.app[keys.SETTINGS].storage_dir / "bundles" / f"{job_id}.zip"
    stale.write_bytes(b"the stalled run's bundle, renamed into place late")
    stale.unlink()  # and its undo, for a cancel that came during the rename

    redirect = await client.get(f"/v1/download/{job_id}", allow_redirects=False)
    download = await client.get(redirect.headers["Location"])
    assert 200 == download.status
    assert hashlib.sha256(await download.read()).hexdigest() == body["result"]["sha256"]


async def test_what_a_stalled_run_writes_after_its_job_ended_and_the_trash_ran_is_deleted(
    make_client: AppFactory,
) -> None:
    """A run stalled mid-write (here: its source of bytes waits) while its job ended
    elsewhere and, a minute on, the trash deleted the job's outputs, none there yet.
    The run wakes, its file lands, its completion is refused: the file goes to the trash
    again and the next sweep deletes it. (It stayed forever: noted, trashed, gone from
    the trash.)"""
    writing, wake = asyncio.Event(), asyncio.Event()
    key = "bundles/late-output.bin"

    async def stalled_bytes() -> AsyncIterator[bytes]:
        writing.set()
        await wake.wait()
        yield b"written after the job ended"

    async def late_writer(ctx: JobContext) -> Artifact:
        info = await ctx.storage.write(key, stalled_bytes())
        return Artifact(key=info.key, filename="late.bin", size_bytes=info.size_bytes)

    # No heartbeat during the test: it would hear the job is gone and stop the run.
    client = await make_client(handlers={"late": late_writer}, lease_s=3600)
    settings = client.app[keys.SETTINGS]
    job_id = await submit(client, "late")
    await asyncio.wait_for(writing.wait(), 10)
    with sqlite3.connect(settings.database_path) as conn:  # ended by another process
        conn.execute(
            "UPDATE jobs SET status = 'canceled', worker_id = NULL, finished_at = ?,"
            " expires_at = ? WHERE id = ?",
            (time.time(), time.time() + 3600, job_id),
        )
        assert [(key,)] == conn.execute("SELECT key FROM trash").fetchall()
        conn.execute("DELETE FROM trash")  # its deletion ran: nothing there yet
    wake.set()

    async def trashed() -> bool:
        with sqlite3.connect(settings.database_path) as conn:
            return [(key,)] == conn.execute("SELECT key FROM trash").fetchall()

    await wait_for(trashed, 10)
    assert settings.storage_dir.joinpath(key).exists()
    assert 1 == await client.app[keys.ENGINE].empty_trash()
    assert not settings.storage_dir.joinpath(key).exists()


async def test_stop_gives_back_a_job_claimed_but_never_started(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """A claim that commits while the dispatcher is being cancelled at shutdown leaves a
    job leased to this worker that never started here: the stop gives it back, so the
    next start runs it at once instead of after LEASE_S."""
    data_dir = tmp_path / "data"
    client = await make_client(data_dir=data_dir, worker_concurrency=0)
    engine = client.app[keys.ENGINE]
    store = client.app[keys.STORE]
    job_id = (await store.insert_job(new_job())).job.id
    await store.claim(engine.worker_id, 3600, 1)  # the claim whose answer was lost
    await client.close()

    reopened = SQLiteStore(data_dir / "longdl.sqlite3")
    await reopened.open()
    try:
        job = await reopened.get_job(job_id)
    finally:
        await reopened.close()
    assert job is not None
    assert (JobStatus.QUEUED, 0, None) == (job.status, job.attempts, job.worker_id)
