"""The SQLite store: the store contract, plus what only SQLite has (the file, its locks,
its query plans, its busy writer)."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from store_contract import Clock, StoreContract, new_job

from longdl import exceptions
from longdl.models import JobStatus
from longdl.store import SQLiteStore, Store, WorkerInfo
from longdl.store.queries import queries


class TestSQLiteStore(StoreContract):
    """Every behaviour of the store contract, on a real SQLite file."""

    @pytest.fixture
    async def make_store(
        self, tmp_path: Path
    ) -> AsyncIterator[Callable[[Callable[[], float]], object]]:
        opened: list[SQLiteStore] = []

        async def make(clock: Callable[[], float]) -> Store:
            store = SQLiteStore(tmp_path / "longdl.sqlite3", clock=clock)
            await store.open()
            opened.append(store)
            return store

        yield make
        for store in opened:
            await store.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "longdl.sqlite3", busy_timeout_ms=1000)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def locked(store: SQLiteStore) -> Iterator[Callable[[], None]]:
    """Another connection holding the database's write lock until the test releases it."""
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(store.path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(30)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    yield release.set
    release.set()
    thread.join()


# Tables whose full scan costs the same at any size, and SQLite's own virtual tables.
_SCAN = re.compile(r"^SCAN (\w+)(?: (USING|VIRTUAL TABLE).*)?$")


def _migrated(db: Path) -> sqlite3.Connection:
    """A connection to a database the store created and migrated, then closed."""

    async def create() -> None:
        created = SQLiteStore(db)
        await created.open()
        await created.close()

    asyncio.run(create())
    return sqlite3.connect(db)


def test_every_statement_uses_an_index(tmp_path: Path) -> None:
    """EXPLAIN QUERY PLAN of each named statement shows no full scan of a table, unless
    the statement says why one is fine: no query costs more as the tables grow."""
    conn = _migrated(tmp_path / "plan.sqlite3")
    scans = []
    for query in queries("sqlite").values():
        params = dict.fromkeys(re.findall(r":(\w+)", query.sql))
        for _, _, _, detail in conn.execute(f"EXPLAIN QUERY PLAN {query.sql}", params):
            match = _SCAN.match(detail)
            if match and match.group(2) is None and query.scan_ok is None:
                scans.append(f"{query.name}: {detail}")
    assert [] == scans


#: ``IN (`` followed by three or more constants: SQLite builds a b-tree to test it.
_LONG_IN_LIST = re.compile(r"\bIN\s*\(\s*'[^']*'(?:\s*,\s*'[^']*'){2,}\s*\)", re.IGNORECASE)


def test_no_write_tests_a_list_of_three_constants(tmp_path: Path) -> None:
    """No trigger, partial index or named statement says ``x IN ('a', 'b', 'c')``:
    SQLite 3.40 builds a temporary b-tree for such a list on every evaluation (~5 us,
    nine times per job before migration 5); ``x = 'a' OR ...`` is tested in place."""
    conn = _migrated(tmp_path / "in.sqlite3")
    schema = conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    texts = [*schema, *((query.name, query.sql) for query in queries("sqlite").values())]
    assert [] == [name for name, sql in texts if _LONG_IN_LIST.search(sql)]


async def test_a_held_write_lock_is_a_busy_store_not_a_wedged_one(
    store: SQLiteStore, locked: Callable[[], None]
) -> None:
    """While another process holds the write lock past the busy timeout, a write fails
    with StoreBusy and leaves nothing; once it lets go, writes land again."""
    with pytest.raises(exceptions.StoreBusy):
        await store.insert_job(new_job("a"))
    locked()
    await store.insert_job(new_job("b"))
    assert (None, "b") == (await store.get_job("a"), getattr(await store.get_job("b"), "id", None))


async def test_a_write_cancelled_while_waiting_for_the_lock_never_runs(
    store: SQLiteStore, locked: Callable[[], None]
) -> None:
    """An insert whose caller gives up while the writer waits for the lock is dropped
    if it had not started, or runs whole; either way the store stays usable."""
    first = asyncio.create_task(store.insert_job(new_job("first")))

    async def writer_took_it() -> bool:
        # The thread writer has taken ``first`` and waits for the lock (private probe).
        # Its queue alone is empty before ``first`` reaches it, too.
        return store._writer is not None and store._writer.taken >= 1

    await wait_for(writer_took_it)
    queued = asyncio.create_task(store.insert_job(new_job("queued")))
    await asyncio.sleep(0)
    queued.cancel()
    locked()
    await asyncio.gather(first, queued, return_exceptions=True)
    assert await store.get_job("queued") is None
    await store.insert_job(new_job("after"))
    assert await store.get_job("after") is not None


async def test_database_files_are_private(store: SQLiteStore) -> None:
    """The database and its WAL are readable by the service's user only."""
    await store.insert_job(new_job())
    modes = [os.stat(f"{store.path}{suffix}").st_mode & 0o777 for suffix in ("", "-wal")]
    assert [0o600, 0o600] == modes


@pytest.mark.parametrize("level, expected", [("normal", 1), ("full", 2)])
async def test_db_synchronous_chooses_the_durability(
    tmp_path: Path, level: str, expected: int
) -> None:
    """DB_SYNCHRONOUS=full makes every commit fsync (PRAGMA synchronous = FULL)."""
    store = SQLiteStore(tmp_path / "d.sqlite3", synchronous=level)  # type: ignore[arg-type]
    await store.open()
    try:
        assert expected == await store.writer_pragma("synchronous")
    finally:
        await store.close()


async def test_a_dead_workers_jobs_come_back_at_once(tmp_path: Path) -> None:
    """A worker whose process is gone (its lock is free) loses its jobs at the next
    rescue, long before their leases would run out."""
    clock = Clock()
    path = tmp_path / "longdl.sqlite3"
    dead = SQLiteStore(path, clock=clock)
    await dead.open()
    await dead.register_worker(WorkerInfo("gone", "host", 1))
    job_id = (await dead.insert_job(new_job())).job.id
    await dead.claim("gone", 3600, 1)
    await dead.close()  # the process ends: the kernel drops its lock
    alive = SQLiteStore(path, clock=clock)
    await alive.open()
    try:
        rescued = await alive.rescue_stalled(max_stalls=2, ttl_s=60, exclude_worker="me")
        assert [job_id] == [job.id for job in rescued.requeued]
        assert "gone" not in await alive.live_workers()
    finally:
        await alive.close()


async def test_a_dead_workers_webhook_deliveries_are_due_at_once(tmp_path: Path) -> None:
    """Deliveries a worker had in flight when its process went are due at the next
    rescue, not when their leases run out."""
    clock = Clock()
    path = tmp_path / "longdl.sqlite3"
    dead = SQLiteStore(path, clock=clock)
    await dead.open()
    await dead.register_worker(WorkerInfo("gone", "host", 1))
    job_id = (await dead.insert_job(new_job(callback_url="https://h.example/"))).job.id
    await dead.cancel(job_id, ttl_s=60, message="Canceled")
    (claimed,) = await dead.claim_webhook_deliveries("gone", 10, lease_s=3600)
    await dead.close()  # the process ends: the kernel drops its lock
    alive = SQLiteStore(path, clock=clock)
    await alive.open()
    try:
        assert [] == await alive.claim_webhook_deliveries("me", 10, lease_s=30)
        rescued = await alive.rescue_stalled(max_stalls=2, ttl_s=60, exclude_worker="me")
        assert 1 == rescued.webhooks_due
        again = await alive.claim_webhook_deliveries("me", 10, lease_s=30)
        assert [claimed.id] == [delivery.id for delivery in again]
    finally:
        await alive.close()


async def test_a_live_workers_jobs_are_left_alone(tmp_path: Path) -> None:
    """Another open store on the same file holds its worker's lock: no rescue."""
    path = tmp_path / "longdl.sqlite3"
    other = SQLiteStore(path)
    await other.open()
    mine = SQLiteStore(path)
    await mine.open()
    try:
        await other.register_worker(WorkerInfo("other", "host", 1))
        await other.insert_job(new_job("a"))
        await other.claim("other", 3600, 1)
        rescued = await mine.rescue_stalled(max_stalls=2, ttl_s=60, exclude_worker="me")
        assert ([], {"other"}) == (rescued.requeued, await mine.live_workers())
        job = await mine.get_job("a")
        assert job is not None
        assert JobStatus.RUNNING == job.status
    finally:
        await mine.close()
        await other.close()


async def test_a_version_3_database_upgrades_with_its_jobs(tmp_path: Path) -> None:
    """A database written by the previous release (schema 3, a job left running) opens:
    its jobs are kept, counted, and the running one is rescued as a stall."""
    path = tmp_path / "longdl.sqlite3"
    from longdl.store.queries import migrations

    conn = sqlite3.connect(path, isolation_level=None)
    for migration in migrations("sqlite")[:3]:
        conn.executescript(migration.sql)
    conn.execute("PRAGMA user_version = 3")
    for job_id, status in (("q", "queued"), ("r", "running"), ("d", "completed")):
        conn.execute(
            "INSERT INTO jobs (id, kind, status, priority, payload, max_attempts, progress, "
            "created_at, updated_at, client) "
            "VALUES (?, 'download', ?, 1, '{}', 3, '{}', 1, 1, 'c')",
            (job_id, status),
        )
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        counts = await store.count_by_status()
        rescued = await store.rescue_stalled(max_stalls=2, ttl_s=60)
        assert (migrations("sqlite")[-1].number, 1, 1, 1) == (
            await store.schema_version(),
            counts[JobStatus.QUEUED],
            counts[JobStatus.RUNNING],
            counts[JobStatus.COMPLETED],
        )
        assert ["r"] == [job.id for job in rescued.requeued]
    finally:
        await store.close()
