"""The PostgreSQL store: the store contract on a real PostgreSQL, plus what only it has
(notifications, replicas sharing one database)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from conftest import wait_for
from store_contract import StoreContract, new_job

from longdl import exceptions
from longdl.models import JobStatus
from longdl.store import Limits, Store, WorkerInfo
from longdl.store.postgres import PostgresStore
from longdl.store.queries import migrations


class TestPostgresStore(StoreContract):
    """Every behaviour of the store contract, on a real PostgreSQL."""

    @pytest.fixture
    async def make_store(
        self, database_url: str
    ) -> AsyncIterator[Callable[[Callable[[], float]], object]]:
        opened: list[PostgresStore] = []

        async def make(clock: Callable[[], float]) -> Store:
            store = PostgresStore(database_url, clock=clock, worker_id="me")
            await store.open()
            opened.append(store)
            return store

        yield make
        for store in opened:
            await store.close()


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[list[PostgresStore]]:
    """Three stores on one database, as three replicas would have."""
    stores = [PostgresStore(database_url, worker_id=f"r{i}") for i in range(3)]
    await asyncio.gather(*(store.open() for store in stores))
    yield stores
    for store in stores:
        await store.close()


async def test_replicas_starting_together_migrate_once(replicas: list[PostgresStore]) -> None:
    """Three stores opened at once on an empty database end on the same schema, the
    newest."""
    newest = len(migrations("postgres"))
    assert [newest] * 3 == [await store.schema_version() for store in replicas]


async def test_claims_across_replicas_never_share_a_job(replicas: list[PostgresStore]) -> None:
    """Replicas claiming at once take each job exactly once (SKIP LOCKED)."""
    for _ in range(60):
        await replicas[0].insert_job(new_job())
    claimed = await asyncio.gather(
        *(store.claim(f"r{i}", 30, 7) for i, store in enumerate(replicas) for _ in range(5))
    )
    ids = [job.id for batch in claimed for job in batch]
    assert 60 == len(ids) == len(set(ids))


async def test_idempotent_inserts_across_replicas_make_one_job(
    replicas: list[PostgresStore],
) -> None:
    """A hundred identical inserts spread over three replicas make one job."""
    results = await asyncio.gather(
        *(
            replicas[i % 3].insert_job(new_job(), idempotency_key="k", request_hash="h")
            for i in range(100)
        )
    )
    assert 1 == len({r.job.id for r in results})
    assert 1 == sum(not r.replayed for r in results)


async def test_limits_hold_across_replicas(replicas: list[PostgresStore]) -> None:
    """Inserts racing on three replicas never pass the per-caller limit."""
    limits = Limits(max_queued=1000, max_active_per_client=10)
    outcomes = await asyncio.gather(
        *(replicas[i % 3].insert_job(new_job(client="c"), limits=limits) for i in range(30)),
        return_exceptions=True,
    )
    assert 10 == sum(not isinstance(o, BaseException) for o in outcomes)
    assert 10 == (await replicas[0].count_by_status())[JobStatus.QUEUED]


async def test_a_change_on_one_replica_is_heard_by_the_others(
    replicas: list[PostgresStore],
) -> None:
    """A status change committed by one replica reaches the others' listeners."""
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    replicas[2].add_change_listener(lambda job_id, status: heard.put_nowait((job_id, status)))
    job_id = (await replicas[0].insert_job(new_job())).job.id
    await replicas[1].cancel(job_id, ttl_s=60, message="Canceled")
    seen = [await asyncio.wait_for(heard.get(), 5) for _ in range(2)]
    assert [(job_id, "queued"), (job_id, "canceled")] == seen


async def _cut_listening(store: PostgresStore, admin: asyncpg.Connection) -> None:
    """End the backend of ``store``'s LISTEN connection, as a database restart or a
    network cut would, and wait until it is gone."""
    pid = await admin.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        store.worker_id,
    )
    assert pid is not None
    await _terminate(admin, pid)


async def _terminate(admin: asyncpg.Connection, pid: int) -> None:
    await admin.execute("SELECT pg_terminate_backend($1)", pid)

    async def gone() -> bool:
        return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

    await wait_for(gone, 10, interval_s=0.01)


async def _status_heard(listener: PostgresStore, writer: PostgresStore, timeout_s: float) -> str:
    """The status ``listener`` hears of a job ``writer`` inserts, inserting another every
    half second until it hears one, for at most ``timeout_s`` (it may be reconnecting)."""
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener.add_change_listener(lambda job_id, status: heard.put_nowait((job_id, status)))
    async with asyncio.timeout(timeout_s):
        while True:
            job_id = (await writer.insert_job(new_job())).job.id
            try:
                async with asyncio.timeout(0.5):
                    while True:
                        change = await heard.get()
                        if change[0] == job_id:
                            return change[1]
            except TimeoutError:
                continue


async def test_a_cut_listening_connection_is_made_again(
    replicas: list[PostgresStore], database_url: str
) -> None:
    """When the LISTEN connection's backend ends, the replica connects again and hears
    other replicas' changes."""
    admin = await asyncpg.connect(database_url)
    try:
        await _cut_listening(replicas[2], admin)
        assert "queued" == await _status_heard(replicas[2], replicas[0], 10)
    finally:
        await admin.close()


async def test_a_listening_connection_cut_before_it_listens_is_made_again(
    replicas: list[PostgresStore], database_url: str
) -> None:
    """The connection made to listen again dies before its LISTEN (the database still
    restarting, say): the replica tries again rather than stop listening for good."""
    store = replicas[2]
    admin = await asyncpg.connect(database_url)
    connect = store._connect
    cut_next = [True]

    async def connect_then_cut() -> asyncpg.Connection:
        conn = await connect()
        if cut_next:
            cut_next.clear()
            other = await asyncpg.connect(database_url)  # admin may be busy meanwhile
            try:
                await _terminate(other, conn.get_server_pid())
            finally:
                await other.close()
        return conn

    store._connect = connect_then_cut  # type: ignore[method-assign]
    try:
        await _cut_listening(store, admin)
        assert "queued" == await _status_heard(store, replicas[0], 10)
        assert not cut_next  # the cut connection was made (and failed to listen)
    finally:
        await admin.close()


async def test_a_replica_whose_connections_are_gone_is_dead(
    replicas: list[PostgresStore],
) -> None:
    """A registered worker with no connection left (its process died) is not live, and
    its jobs come back at the next rescue, before their leases run out."""
    gone = replicas[1]
    await gone.register_worker(WorkerInfo("r1", "host", 1))
    await replicas[0].register_worker(WorkerInfo("r0", "host", 1))
    job_id = (await gone.insert_job(new_job())).job.id
    await gone.claim("r1", 3600, 1)
    await gone.close()  # the replica's connections end, as when its process dies
    assert "r1" not in await replicas[0].live_workers()
    rescued = await replicas[0].rescue_stalled(max_stalls=2, ttl_s=60, exclude_worker="r0")
    assert [job_id] == [job.id for job in rescued.requeued]


async def test_a_replica_dropped_after_missing_its_beats_is_live_again_at_its_next(
    replicas: list[PostgresStore], database_url: str
) -> None:
    """A replica that missed its heartbeats (paused, starved) is taken for dead and
    dropped by another's rescue; its next heartbeat registers it again. (It stayed dead
    to the others for good: they took its jobs and its part files at every rescue.)"""
    paused = replicas[1]
    await paused.register_worker(WorkerInfo("r1", "host", 1))
    await replicas[0].register_worker(WorkerInfo("r0", "host", 1))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE workers SET heartbeat_at = 0 WHERE id = 'r1'")
    finally:
        await conn.close()
    await replicas[0].rescue_stalled(max_stalls=2, ttl_s=60, exclude_worker="r0")
    assert "r1" not in await replicas[0].live_workers()

    await paused.heartbeat("r1", 30, {})

    assert "r1" in await replicas[0].live_workers()


async def test_a_dead_replicas_webhook_deliveries_are_due_at_once(
    replicas: list[PostgresStore],
) -> None:
    """Deliveries a replica had in flight when its process died are due at the next
    rescue on another replica, not when their leases run out."""
    gone = replicas[1]
    await gone.register_worker(WorkerInfo("r1", "host", 1))
    await replicas[0].register_worker(WorkerInfo("r0", "host", 1))
    job_id = (await gone.insert_job(new_job(callback_url="https://h.example/"))).job.id
    await gone.cancel(job_id, ttl_s=60, message="Canceled")
    (claimed,) = await gone.claim_webhook_deliveries("r1", 10, lease_s=3600)
    await gone.close()  # the replica's connections end, as when its process dies
    assert [] == await replicas[0].claim_webhook_deliveries("r0", 10, lease_s=30)
    rescued = await replicas[0].rescue_stalled(max_stalls=2, ttl_s=60, exclude_worker="r0")
    assert 1 == rescued.webhooks_due
    again = await replicas[0].claim_webhook_deliveries("r0", 10, lease_s=30)
    assert [claimed.id] == [delivery.id for delivery in again]


async def test_an_upgraded_database_counts_the_jobs_it_had(database_url: str) -> None:
    """A database made by migration 1 with unfinished jobs in it keeps each caller's
    limit once migration 2 moves the counts to kept deltas."""
    first = migrations("postgres")[0]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TABLE longdl_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        await conn.execute(first.sql)
        await conn.execute("INSERT INTO longdl_migrations VALUES (1, $1)", first.name)
        for i, status in enumerate(["queued", "running", "queued", "completed"]):
            await conn.execute(
                "INSERT INTO jobs (id, kind, status, priority, payload, max_attempts,"
                " progress, client, created_at, updated_at)"
                " VALUES ($1, 'download', $2, 1, '{}', 3, '{}', 'c', $3, $3)",
                f"old-{i}",
                status,
                float(i),
            )
    finally:
        await conn.close()
    store = PostgresStore(database_url, worker_id="new")
    await store.open()
    try:
        limits = Limits(max_queued=100, max_active_per_client=5)
        await store.insert_job(new_job(client="c"), limits=limits)
        await store.insert_job(new_job(client="c"), limits=limits)  # 3 old + 2 new
        with pytest.raises(exceptions.TooManyActiveJobs):
            await store.insert_job(new_job(client="c"), limits=limits)
    finally:
        await store.close()


async def test_a_writing_replica_vacuums_the_kept_counts(database_url: str) -> None:
    """Every change leaves a dead delta row behind; a replica that writes vacuums them
    within seconds, so counting stays as cheap as the queue is long (autovacuum looks
    once a minute)."""
    store = PostgresStore(database_url, worker_id="w")
    await store.open()
    try:
        for _ in range(200):  # three folds of the queued count, and their dead rows
            await store.insert_job(new_job(), limits=Limits(10_000, 10_000))
        conn = await asyncpg.connect(database_url)
        try:
            deadline = asyncio.get_running_loop().time() + 20
            vacuums = 0
            while vacuums == 0 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.2)  # polling interval of a deadline loop
                vacuums = await conn.fetchval(
                    "SELECT vacuum_count FROM pg_stat_user_tables"
                    " WHERE relname = 'job_count_deltas'"
                )
            assert vacuums > 0
            assert 200 == (await store.count_by_status())[JobStatus.QUEUED]
        finally:
            await conn.close()
    finally:
        await store.close()
