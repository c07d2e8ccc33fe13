"""The PostgreSQL store: one database shared by any number of longdl replicas.

Chosen by ``DATABASE_URL=postgresql://…``. asyncpg drives it (the fastest well-kept
asyncio driver, with its own pool and LISTEN support; psycopg 3 would need psycopg-pool
beside it and is slower per statement here).

- Writes are units (coroutines taking a connection) run by one writer task per replica:
  units queued together share one transaction, a savepoint each (group commit). A unit
  not yet taken when its caller is cancelled never runs; a taken one finishes, since
  callers never run it themselves. Should a unit run without a savepoint (an insert)
  fail on a statement, PostgreSQL aborts the whole transaction: the batch then runs
  again with a savepoint for every unit, so only that unit fails.
- Claims and sweeps use ``FOR UPDATE SKIP LOCKED``; inserts of all replicas take turns on
  an advisory transaction lock, so the limits and idempotency keys hold exactly. An
  insert is one call of a function (``longdl_insert_job``, migration 2): one round trip
  while the lock is held, not five.
- Every change of a job's status or progress NOTIFYs ``longdl_jobs`` (a trigger); each
  replica LISTENs on a connection of its own and wakes its long-polls, event streams,
  waits and dispatcher.
- Each replica's connections carry its worker id as ``application_name``: a replica that
  died has none left in ``pg_stat_activity``, so its jobs come back at once, not when
  their leases run out (unless connections are pooled in between, which hides them: then
  leases alone decide).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import asyncpg

from longdl import exceptions
from longdl.callbacks import call_each
from longdl.models import Job, JobStatus, Progress
from longdl.store import base
from longdl.store.base import (
    IDEMPOTENCY_TTL_S,
    AfterCommit,
    Claim,
    DeliveryStatus,
    Heartbeat,
    Inserted,
    Limits,
    NewJob,
    Rescued,
    TrashItem,
    WebhookDelivery,
    WorkerInfo,
    dump_text_json,
    insert_params,
    row_to_delivery,
    row_to_job,
)
from longdl.store.queries import migrations, queries

log = logging.getLogger("longdl.store")

T = TypeVar("T")
Unit = Callable[[asyncpg.Connection], Awaitable["T | AfterCommit[T]"]]
ChangeListener = Callable[[str, str], None]

#: How often a replica that writes vacuums the kept counts (see _vacuum_counts).
VACUUM_COUNTS_S = 1.0
#: Units sharing one transaction at most.
MAX_BATCH = 256
SWEEP_BATCH = 500
WORKER_ROW_TTL_S = 24 * 3600
#: The advisory lock migrations run under (replicas starting together migrate once).
MIGRATION_LOCK = 7202407111
#: Channel of the change notifications.
CHANNEL = "longdl_jobs"

_PARAM = re.compile(r"(?<![:\w]):(\w+)")


class _Statement:
    """A named query in asyncpg's form: ``$n`` placeholders and the names they take."""

    def __init__(self, sql: str) -> None:
        self.names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.names:
                self.names.append(name)
            return f"${self.names.index(name) + 1}"

        self.sql = _PARAM.sub(number, sql)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


S = {name: _Statement(query.sql) for name, query in queries("postgres").items()}


def translate(exc: BaseException) -> exceptions.StoreUnavailable:
    """The longdl error for a database failure that retrying later can fix."""
    return _by_state(getattr(exc, "sqlstate", None), f"{type(exc).__name__}: {exc}")


def _unreachable(exc: BaseException) -> exceptions.StoreUnavailable:
    """The longdl error for a connection to PostgreSQL that could not be made."""
    return exceptions.StoreUnavailable(f"Cannot reach PostgreSQL: {exc}")


def _by_state(sqlstate: str | None, what: str) -> exceptions.StoreUnavailable:
    """The longdl error for a failure with SQLSTATE ``sqlstate`` (None: not a statement's),
    raised by asyncpg or caught inside a store function."""
    if sqlstate == asyncpg.exceptions.DiskFullError.sqlstate:
        return exceptions.StoreFull("The database's disk is full; try again later", 30)
    if sqlstate in (
        asyncpg.exceptions.LockNotAvailableError.sqlstate,
        asyncpg.DeadlockDetectedError.sqlstate,
    ):
        return exceptions.StoreBusy("The database is busy; try again")
    return exceptions.StoreUnavailable(f"The database failed: {what}")


#: Failures of the database (or the way to it) rather than of a statement's logic.
_DATABASE_ERRORS = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.InterfaceError,
    # "cannot switch to state ...; another operation is in progress": a connection the
    # server ended mid-operation (seen after PostgreSQL restarts under load).
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)
#: What may end a LISTEN connection, or stop one being made: the replica tries again.
_LISTEN_ERRORS = (*_DATABASE_ERRORS, asyncpg.PostgresError)


#: A unit, its caller's future, and whether it runs in a savepoint.
_Item = tuple[Callable[[asyncpg.Connection], Awaitable[Any]], "asyncio.Future[Any]", bool]


class _Writer:
    """The replica's writer task; concurrent units share a transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="longdl postgres writer")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._queue.put_nowait(None)
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def run(self, unit: Unit[T], savepoint: bool = True) -> T:
        if self._task is None:
            raise exceptions.StoreUnavailable("The store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((unit, future, savepoint))
        # A caller cancelled before the writer takes its unit cancels the future: the
        # writer skips it. Once taken, the unit runs whole; the result is dropped.
        return await future

    async def _serve(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH and not self._queue.empty():
                more = self._queue.get_nowait()
                if more is None:
                    stop = True
                    break
                batch.append(more)
            units = [item for item in batch if not item[1].done()]
            if units:
                await self._together(units)
            if stop:
                return

    async def _together(self, units: list[_Item]) -> None:
        try:
            try:
                outcomes, after = await _transaction(self._pool, units, careful=False)
            except _Aborted as aborted:
                # A unit without a savepoint failed on a statement, and PostgreSQL
                # aborted the whole transaction, the units before it included. Each runs
                # again in a savepoint of its own: the failure stays with its unit.
                log.info("store.batch_redone units=%d error=%r", len(units), aborted.__cause__)
                outcomes, after = await _transaction(self._pool, units, careful=True)
        except Exception as exc:
            error = exc if isinstance(exc, exceptions.LongdlError) else translate(exc)
            log.warning("store.write_failed units=%d error=%r", len(units), exc)
            for _, future, _ in units:
                if not future.done():
                    future.set_exception(error)
            return
        call_each(after, log=log, what="after-commit callback")
        for future, value, failure in outcomes:
            if future.done():
                continue  # its caller was cancelled meanwhile: the unit still ran whole
            if failure is None:
                future.set_result(value)
            else:
                future.set_exception(failure)


class _Aborted(Exception):
    """A unit run without a savepoint failed on a statement: the transaction is lost."""


_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


@contextlib.contextmanager
def _statement_aborts() -> Iterator[None]:
    """A statement failing here, outside a savepoint, has aborted the transaction: raise
    :class:`_Aborted` (a failure of the database itself stays what it is)."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        if isinstance(exc, _DATABASE_ERRORS):
            raise
        raise _Aborted from exc


class _Pipelined:
    """A unit of one statement that returns exactly one row, and what its row becomes.
    The writer sends the statements of such units queued together in one round trip
    (asyncpg's ``fetchmany``, whose rows come back as one list) instead of one each: a
    replica's inserts hold the inserts' advisory lock for that long."""

    __slots__ = ("args", "finish", "name")

    def __init__(self, name: str, params: Mapping[str, Any], finish: Callable[[Any], Any]) -> None:
        self.name = name
        self.args = S[name].args(params)
        self.finish = finish

    async def __call__(self, conn: asyncpg.Connection) -> Any:
        return self.finish(await conn.fetchrow(S[self.name].sql, *self.args))


def _runs(units: list[_Item], careful: bool) -> list[list[_Item]]:
    """``units`` in order, those of one pipelined statement side by side grouped (unless
    ``careful``: then each runs alone)."""

    def run_of(item: _Item) -> object:
        unit, _, savepoint = item
        if careful or savepoint or not isinstance(unit, _Pipelined):
            return id(item)  # alone
        return unit.name

    return [list(run) for _, run in itertools.groupby(units, run_of)]


async def _transaction(
    pool: asyncpg.Pool, units: list[_Item], careful: bool
) -> tuple[list[_Outcome], list[Callable[[], object]]]:
    """Run ``units`` in one transaction; their outcomes and the callbacks for after its
    commit. ``careful`` runs every unit alone in a savepoint, even those that asked for
    none.

    Raises:
        _Aborted: (not careful) a unit without a savepoint failed on a statement.
    """
    outcomes: list[_Outcome] = []
    after: list[Callable[[], object]] = []
    async with pool.acquire() as conn, conn.transaction():
        for run in _runs(units, careful):
            rows = None
            if len(run) > 1:  # one pipelined statement, several times
                pipelined = [cast(_Pipelined, unit) for unit, _, _ in run]
                with _statement_aborts():
                    rows = await conn.fetchmany(
                        S[pipelined[0].name].sql, [unit.args for unit in pipelined]
                    )
                if len(rows) != len(run):  # a statement broke the one-row rule
                    raise _Aborted from AssertionError(f"{len(rows)} rows for {len(run)} units")
            for index, (unit, future, savepoint) in enumerate(run):
                try:
                    if rows is not None:
                        value = pipelined[index].finish(rows[index])
                    elif savepoint or careful:
                        async with conn.transaction():
                            value = await unit(conn)
                    else:  # a unit of one statement that cannot half-fail
                        with _statement_aborts():
                            value = await unit(conn)
                    if isinstance(value, AfterCommit):
                        after.append(value.callback)
                        value = value.value
                except (*_DATABASE_ERRORS, _Aborted):
                    raise  # the transaction is gone: the whole batch goes
                except asyncpg.DataError as exc:
                    outcomes.append((future, None, exceptions.Unstorable(str(exc))))
                except Exception as exc:
                    outcomes.append((future, None, exc))
                else:
                    outcomes.append((future, value, None))
    return outcomes, after


class PostgresStore(base.SQLStore):
    """Durable job state in a PostgreSQL database that replicas share.

    Args:
        dsn: ``postgresql://user:password@host:port/db`` or the socket form
            ``postgresql://user@/db?host=/run/postgresql``.
        worker_id: this replica's worker id, sent as the connections' application_name.
        pool_size: most connections in the pool (plus one for LISTEN).
        stale_after_s: a worker without a heartbeat for this long is dead (LEASE_S).
        busy_timeout_ms: lock_timeout of every statement.
        clock: source of epoch seconds, injectable for tests.
    """

    name = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        worker_id: str = "longdl",
        pool_size: int = 10,
        stale_after_s: float = 30.0,
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dsn = dsn
        self.worker_id = worker_id
        self.pool_size = pool_size
        self.stale_after_s = stale_after_s
        self.busy_timeout_ms = busy_timeout_ms
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._writer: _Writer | None = None
        self._listeners: list[ChangeListener] = []
        self._reconnected: list[Callable[[], None]] = []
        self._listen_task: asyncio.Task[None] | None = None
        self._vacuum_task: asyncio.Task[None] | None = None
        #: Writes since the kept counts were last vacuumed.
        self._writes = 0
        #: Workers registered through this store: alive while it is open, and registered
        #: again by their heartbeats should a rescue have dropped them.
        self._registered: dict[str, WorkerInfo] = {}

    # --- lifecycle ---------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        return {
            "application_name": self.worker_id[:63],
            "lock_timeout": f"{int(self.busy_timeout_ms)}ms",
        }

    async def open(self) -> None:
        """Connect, migrate under an advisory lock, start the writer and the listener."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                server_settings=self._server_settings(),
                reset=_no_session_state,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise _unreachable(exc) from exc
        try:
            await self._migrate()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        self._writer = _Writer(self._pool)
        self._writer.start()
        listening = asyncio.Event()
        self._listen_task = asyncio.create_task(
            self._listen(listening), name="longdl postgres listen"
        )
        self._vacuum_task = asyncio.create_task(
            self._vacuum_counts(), name="longdl postgres vacuum"
        )
        # Changes committed from here on are heard (a later connection loss says so).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await listening.wait()

    async def close(self) -> None:
        for task in (self._listen_task, self._vacuum_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._listen_task = self._vacuum_task = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def _connect(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool (LISTEN, migrations)."""
        return await asyncpg.connect(self.dsn, server_settings=self._server_settings())

    async def _migrate(self) -> None:
        # A connection of its own, closed after: the session's advisory lock goes with it
        # whatever happens (pooled connections keep no session state: _no_session_state).
        try:
            conn = await self._connect()
        except (OSError, asyncpg.PostgresError) as exc:
            raise _unreachable(exc) from exc
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS longdl_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM longdl_migrations")}
            for migration in migrations("postgres"):
                if migration.number in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO longdl_migrations (version, name) VALUES ($1, $2)",
                        migration.number,
                        migration.name,
                    )
                log.info("store.migrated version=%d name=%s", migration.number, migration.name)
        finally:
            await conn.close()

    async def _write(self, unit: Unit[T], savepoint: bool = True) -> T:
        """Run ``unit`` in the writer's next transaction, in a savepoint of its own unless
        it is one statement that undoes its own writes when it fails."""
        if self._writer is None:
            raise RuntimeError("store is not open")
        self._writes += 1
        return await self._writer.run(unit, savepoint)

    async def _vacuum_counts(self) -> None:
        """Vacuum the kept counts every VACUUM_COUNTS_S while this replica writes.

        Every change appends a delta and inserts fold them (migration 2), leaving a dead
        row per change; autovacuum looks once a minute, and until then every count steps
        over them: after a burst of 20,000 jobs inserts ran at a fifth of their rate. A
        replica another is vacuuming skips its turn (SKIP_LOCKED).
        """
        while True:
            await asyncio.sleep(VACUUM_COUNTS_S)
            if not self._writes:
                continue
            self._writes = 0
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute(
                        "VACUUM (SKIP_LOCKED) job_count_deltas, client_active_deltas"
                    )
            except Exception as exc:  # the next turn tries again
                log.info("store.vacuum_failed error=%r", exc)

    async def _read_all(self, name: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        statement = S[name]
        try:
            return list(await self.pool.fetch(statement.sql, *statement.args(params or {})))
        except _DATABASE_ERRORS as exc:
            raise translate(exc) from exc

    async def _read_one(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        rows = await self._read_all(name, params)
        return rows[0] if rows else None

    async def ping(self) -> None:
        await self._read_all("next_webhook_attempt_at")
        await self._write(_noop)

    async def schema_version(self) -> int:
        value = await self.pool.fetchval("SELECT max(version) FROM longdl_migrations")
        return int(value or 0)

    def pool_stats(self) -> dict[str, int]:
        """Connections of the pool: its size, how many are idle, its maximum."""
        pool = self.pool
        return {
            "size": pool.get_size(),
            "idle": pool.get_idle_size(),
            "max": pool.get_max_size(),
        }

    # --- change notifications ----------------------------------------------------------

    def add_change_listener(
        self, on_change: ChangeListener, on_reconnect: Callable[[], None] | None = None
    ) -> None:
        """Call ``on_change(job_id, status)`` for every change any replica commits;
        ``on_reconnect()`` after the listening connection was lost (changes may have been
        missed: look again)."""
        self._listeners.append(on_change)
        if on_reconnect is not None:
            self._reconnected.append(on_reconnect)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        job_id, _, status = payload.partition(" ")
        call_each(self._listeners, job_id, status, log=log, what="change listener")

    async def _listen(self, listening: asyncio.Event) -> None:
        """Hold a LISTEN connection, reconnecting with backoff when it drops (also when
        it drops between connecting and listening, as it may while the database
        restarts)."""
        delay_s = 0.1
        first = True
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                conn.add_termination_listener(functools.partial(_set_event, lost))
                await conn.add_listener(CHANNEL, self._notified)
            except _LISTEN_ERRORS as exc:
                log.warning("store.listen_failed retry_in_s=%.1f error=%r", delay_s, exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)
                continue
            try:
                listening.set()
                delay_s = 0.1
                if not first:
                    log.info("store.listening_again")
                    call_each(self._reconnected, log=log, what="reconnect listener")
                first = False
                await lost.wait()
                log.warning("store.listen_lost")
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    # --- reads -------------------------------------------------------------------------

    # --- submitting --------------------------------------------------------------------

    async def insert_job(
        self,
        new: NewJob,
        *,
        idempotency_key: str | None = None,
        request_hash: str = "",
        limits: Limits | None = None,
        claim: Claim | None = None,
    ) -> Inserted:
        now = self._clock()
        progress = new.progress or Progress()
        loop = asyncio.get_running_loop()
        params = {
            **insert_params(new, progress, now),
            "key": idempotency_key,
            "request_hash": request_hash,
            "stale_before": now - IDEMPOTENCY_TTL_S,
            "limited": limits is not None,
            "max_queued": limits.max_queued if limits else 0,
            "max_active": limits.max_active_per_client if limits else 0,
            "worker_id": claim.worker_id if claim else None,
            "lease_until": now + claim.lease_s if claim else None,
        }

        def inserted(row: Any) -> Inserted | AfterCommit[Inserted]:
            if row["error_code"] is not None:
                # The function undid its writes; its failure reads as translate says.
                raise _by_state(row["error_code"], f"{row['error_code']}: {row['error_message']}")
            if row["replayed"]:
                return Inserted(row_to_job(row), True, row["request_hash"])
            if row["id"] is None:  # a limit refused it
                assert limits is not None, "only a limit refuses an insert"
                limits.check(row["queued"], row["active"])
                raise AssertionError(f"insert refused within limits: {dict(row)}")
            job = row_to_job(row)
            if claim is not None and job.status is JobStatus.RUNNING:
                on_claimed = claim.on_claimed
                return AfterCommit(  # the engine starts it once it is committed
                    Inserted(job, False), lambda: loop.call_soon(on_claimed, job)
                )
            return Inserted(job, False)

        # One statement, whose function undoes its own writes when it fails: no savepoint;
        # inserts queued together go in one round trip.
        return await self._write(_Pipelined("insert_job", params, inserted), savepoint=False)

    # --- workers and leases ------------------------------------------------------------

    async def register_worker(self, worker: WorkerInfo) -> None:
        params = {"id": worker.id, "host": worker.host, "pid": worker.pid, "now": self._clock()}
        await self._write(lambda conn: _execute(conn, "register_worker", params))
        self._registered[worker.id] = worker

    async def unregister_worker(self, worker_id: str) -> None:
        now = self._clock()
        await self._write(lambda conn: _forget_worker(conn, worker_id, now))
        self._registered.pop(worker_id, None)

    async def _worker_liveness(self) -> tuple[list[str], set[str]]:
        """Registered worker ids, and those alive: a fresh heartbeat, and (when this
        deployment shows it, i.e. our own id is visible) connections open."""
        now = self._clock()
        rows = await self._read_all("workers")
        connected = {row[0] for row in await self._read_all("connected_workers")}
        trusted = self.worker_id[:63] in connected
        connected |= {worker_id[:63] for worker_id in self._registered}
        alive = {
            row["id"]
            for row in rows
            if now - row["heartbeat_at"] <= self.stale_after_s
            and (not trusted or row["id"][:63] in connected)
        }
        return [row["id"] for row in rows], alive

    async def live_workers(self) -> set[str]:
        return (await self._worker_liveness())[1]

    async def claim(self, worker_id: str, lease_s: float, limit: int) -> list[Job]:
        now = self._clock()
        params = {"now": now, "worker_id": worker_id, "lease_until": now + lease_s, "limit": limit}

        async def unit(conn: asyncpg.Connection) -> list[Job]:
            jobs = [row_to_job(row) for row in await _fetch(conn, "claim", params)]
            jobs.sort(key=lambda j: (-int(j.priority), j.run_after, j.created_at))
            return jobs

        return await self._write(unit, savepoint=False)

    async def heartbeat(
        self, worker_id: str, lease_s: float, progress: Mapping[str, Progress]
    ) -> Heartbeat:
        now = self._clock()
        updates = [
            S["save_progress"].args(
                {
                    "id": job_id,
                    "worker_id": worker_id,
                    "now": now,
                    "progress": dump_text_json(p.to_dict()),
                }
            )
            for job_id, p in progress.items()
        ]

        async def unit(conn: asyncpg.Connection) -> Heartbeat:
            if updates:
                await conn.executemany(S["save_progress"].sql, updates)
            held = await _fetch(
                conn, "renew_leases", {"worker_id": worker_id, "lease_until": now + lease_s}
            )
            worker = self._registered.get(worker_id)
            if worker is None:
                await _execute(conn, "beat", {"id": worker_id, "now": now})
            else:
                # Registered again if another replica's rescue dropped it (it missed its
                # beats for a while, paused or starved): else it stays dead to them for
                # good, and they take its jobs and part files at every rescue and scan.
                params = {"id": worker.id, "host": worker.host, "pid": worker.pid, "now": now}
                await _execute(conn, "register_worker", params)
            return Heartbeat(frozenset(row["id"] for row in held))

        return await self._write(unit)

    async def rescue_stalled(
        self, *, max_stalls: int, ttl_s: float, exclude_worker: str | None = None
    ) -> Rescued:
        ids, alive = await self._worker_liveness()
        dead = [i for i in ids if i != exclude_worker and i not in alive]
        now = self._clock()

        async def unit(conn: asyncpg.Connection) -> Rescued:
            webhooks_due = 0
            for worker_id in dead:
                await _execute(conn, "drop_leases_of", {"worker_id": worker_id})
                webhooks_due += await _forget_worker(conn, worker_id, now)
            await _execute(conn, "forget_stale_workers", {"before": now - WORKER_ROW_TTL_S})
            rescued = Rescued(webhooks_due=webhooks_due)
            stalled = await _fetch(
                conn, "stalled", {"now": now, "exclude": exclude_worker, "limit": SWEEP_BATCH}
            )
            for row in stalled:
                job = row_to_job(row)
                if job.stalls + 1 >= max_stalls:
                    error, progress = base.worker_lost(job)
                    params = {
                        "id": job.id,
                        "now": now,
                        "error": dump_text_json(error),
                        "progress": dump_text_json(progress.to_dict()),
                        "expires_at": now + ttl_s,
                    }
                    lost = await _fetchrow(conn, "fail_stalled", params)
                    if lost is not None:
                        rescued.lost.append(row_to_job(lost))
                else:
                    progress = base.requeued_progress(job, "Re-queued: its worker stopped")
                    params = {
                        "id": job.id,
                        "now": now,
                        "progress": dump_text_json(progress.to_dict()),
                    }
                    again = await _fetchrow(conn, "requeue_stalled", params)
                    if again is not None:
                        rescued.requeued.append(row_to_job(again))
            return rescued

        return await self._write(unit)

    # --- a held job --------------------------------------------------------------------

    async def _held_write(self, name: str, params: dict[str, Any]) -> Job | None:
        params = {"now": self._clock(), **params}

        async def unit(conn: asyncpg.Connection) -> Job | None:
            row = await _fetchrow(conn, name, params)
            return row_to_job(row) if row else None

        # Not pipelined: a write the worker may no longer hold returns no row, and
        # fetchmany's rows could not be told apart then.
        return await self._write(unit, savepoint=False)

    async def add_output(self, job_id: str, worker_id: str, key: str) -> bool:
        params = {"id": job_id, "worker_id": worker_id, "key": key}

        async def unit(conn: asyncpg.Connection) -> bool:
            return await _fetchrow(conn, "add_output", params) is not None

        return await self._write(unit)

    async def release_all(self, worker_id: str, message: str) -> list[str]:
        params = {"worker_id": worker_id, "message": message, "now": self._clock()}

        async def unit(conn: asyncpg.Connection) -> list[str]:
            return [row["id"] for row in await _fetch(conn, "release_all", params)]

        return await self._write(unit)

    # --- anyone ------------------------------------------------------------------------

    async def cancel(self, job_id: str, ttl_s: float, message: str) -> Job | None:
        now = self._clock()
        error = {"code": "CANCELED", "message": message, "retryable": False}
        return await self._held_write(
            "cancel",
            {
                "id": job_id,
                "now": now,
                "error": dump_text_json(error),
                "message": message,
                "expires_at": now + ttl_s,
            },
        )

    # --- maintenance -------------------------------------------------------------------

    async def expire_due(self, limit: int) -> list[Job]:
        params = {"now": self._clock(), "limit": limit}

        async def unit(conn: asyncpg.Connection) -> list[Job]:
            return [row_to_job(row) for row in await _fetch(conn, "expire_due", params)]

        return await self._write(unit)

    async def purge(self, retention_s: float, limit: int) -> int:
        now = self._clock()

        async def unit(conn: asyncpg.Connection) -> int:
            await _execute(conn, "purge_keys", {"before": now - IDEMPOTENCY_TTL_S, "limit": limit})
            rows = await _fetch(conn, "purge_jobs", {"before": now - retention_s, "limit": limit})
            return len(rows)

        return await self._write(unit)

    async def compact(self) -> None:
        async def unit(conn: asyncpg.Connection) -> None:
            await _execute(conn, "lock_inserts", {})
            await _execute(conn, "compact_counts", {})
            await _execute(conn, "compact_client_counts", {})

        await self._write(unit)

    async def claim_trash(self, limit: int, lease_s: float) -> list[TrashItem]:
        now = self._clock()
        params = {"now": now, "lease_until": now + lease_s, "limit": limit}

        async def unit(conn: asyncpg.Connection) -> list[TrashItem]:
            rows = await _fetch(conn, "claim_trash", params)
            return [TrashItem(row["key"], row["job_id"], row["attempts"]) for row in rows]

        return await self._write(unit)

    async def trash_late_outputs(self, job_id: str, keys: Sequence[str]) -> int:
        params = {"id": job_id, "keys": list(keys), "now": self._clock()}
        rows = await self._write(
            lambda conn: _fetch(conn, "trash_late_outputs", params), savepoint=False
        )
        return len(rows)

    async def trash_done(self, keys: Sequence[str]) -> None:
        params = {"keys": list(keys)}
        await self._write(lambda conn: _execute(conn, "trash_done", params))

    async def trash_retry(self, keys: Sequence[str], delay_s: float) -> None:
        params = {"keys": list(keys), "next_attempt_at": self._clock() + delay_s}
        await self._write(lambda conn: _execute(conn, "trash_retry", params))

    # --- webhook deliveries ------------------------------------------------------------

    async def claim_webhook_deliveries(
        self, worker_id: str, limit: int, lease_s: float
    ) -> list[WebhookDelivery]:
        now = self._clock()
        params = {"now": now, "worker_id": worker_id, "lease_until": now + lease_s, "limit": limit}

        async def unit(conn: asyncpg.Connection) -> list[WebhookDelivery]:
            rows = await _fetch(conn, "claim_webhook_deliveries", params)
            return sorted((row_to_delivery(r) for r in rows), key=lambda d: (d.created_at, d.id))

        return await self._write(unit)

    async def set_webhook_payload(self, delivery_id: str, payload: str) -> str | None:
        params = {"id": delivery_id, "payload": payload}

        async def unit(conn: asyncpg.Connection) -> str | None:
            row = await _fetchrow(conn, "set_webhook_payload", params)
            return None if row is None else str(row["payload"])

        return await self._write(unit)

    async def record_webhook_attempt(
        self,
        delivery_id: str,
        status: DeliveryStatus,
        *,
        attempted: bool,
        next_attempt_at: float | None = None,
        error: str | None = None,
        status_code: int | None = None,
    ) -> WebhookDelivery | None:
        params = {
            "id": delivery_id,
            "status": status,
            "attempted": int(attempted),
            "next_attempt_at": next_attempt_at,
            "error": error,
            "status_code": status_code,
            "now": self._clock(),
        }

        async def unit(conn: asyncpg.Connection) -> WebhookDelivery | None:
            row = await _fetchrow(conn, "record_webhook_attempt", params)
            return row_to_delivery(row) if row else None

        return await self._write(unit)


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset of a connection coming back, after asyncpg has rolled back any
    transaction left open: nothing more. longdl keeps no session state on pooled
    connections (no SET, LISTEN, cursor or session advisory lock), and asyncpg's default
    (RESET ALL, UNLISTEN *, CLOSE ALL, pg_advisory_unlock_all) cost a round trip on every
    release: a fifth of a poll of a job running on another replica."""


def _set_event(event: asyncio.Event, _conn: object) -> None:
    event.set()


async def _noop(conn: asyncpg.Connection) -> None:
    return None


async def _fetch(conn: asyncpg.Connection, name: str, params: Mapping[str, Any]) -> list[Any]:
    statement = S[name]
    return list(await conn.fetch(statement.sql, *statement.args(params)))


async def _fetchrow(conn: asyncpg.Connection, name: str, params: Mapping[str, Any]) -> Any:
    statement = S[name]
    return await conn.fetchrow(statement.sql, *statement.args(params))


async def _execute(conn: asyncpg.Connection, name: str, params: Mapping[str, Any]) -> None:
    statement = S[name]
    await conn.execute(statement.sql, *statement.args(params))


async def _forget_worker(conn: asyncpg.Connection, worker_id: str, now: float) -> int:
    """Delete a worker's row (its stop, or a rescue finding it dead), making the webhook
    deliveries it had leased due now: with the row gone, no rescue would find their
    leases, and they would wait for them to run out. Every replica hears of them (a
    stopping one cannot send them). How many were made due."""
    params = {"worker_id": worker_id, "now": now}
    due = len(await _fetch(conn, "drop_webhook_leases_of", params))
    await _execute(conn, "unregister_worker", {"id": worker_id})
    if due:
        payload = f" {base.WEBHOOKS_DUE}"  # no job: see add_change_listener
        await _execute(conn, "notify_webhooks_due", {"channel": CHANNEL, "payload": payload})
    return due
