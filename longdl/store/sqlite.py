"""The SQLite store: one file in WAL mode, the zero-configuration default.

Writes: one connection on one thread runs every write as a *unit*, a plain function of
the connection. Units queued while the thread is busy share one transaction (group
commit): each runs inside its own savepoint, so one unit's error undoes only that unit,
and the batch commits once, with one fsync when ``DB_SYNCHRONOUS=full``. A unit runs
whole or not at all whatever happens to the coroutine awaiting it: one that has not
started when its caller is cancelled never runs (``concurrent.futures`` semantics), one
that has started finishes on the thread, and the connection is never left inside a
transaction.

Writes that need no fsync run in place on the event loop when no other process holds
the lock (``_LoopWriter``): a WAL commit with ``synchronous=NORMAL`` takes microseconds,
less than the hand-over to the thread and back.

Reads: a read-only connection of their own on the loop, which sees only committed data
and never waits for the writer (WAL).

Several processes may share the file (one host): each process is a worker holding an
advisory lock on a file of its own next to the database, which the kernel releases when
the process dies however it dies, so a crashed worker's jobs are taken back at once
instead of when their leases run out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from longdl import exceptions
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
#: A unit of work on a writing connection; its value (or an AfterCommit) is the result.
Unit = Callable[[sqlite3.Connection], "T | AfterCommit[T]"]

Q = {name: query.sql for name, query in queries("sqlite").items()}

#: Units sharing one transaction at most.
MAX_BATCH = 256
#: Rows one maintenance statement touches at most.
SWEEP_BATCH = 500
#: A read waits at most this long for SQLite's rare reader locks (WAL recovery).
READ_BUSY_TIMEOUT_MS = 50
#: How often the WAL is copied back into the database while the loop writer writes.
CHECKPOINT_INTERVAL_S = 1.0
#: Worker rows without a heartbeat for this many seconds are forgotten.
WORKER_ROW_TTL_S = 24 * 3600


def translate(exc: sqlite3.Error) -> exceptions.StoreUnavailable:
    """The longdl error for an SQLite failure that retrying later can fix."""
    name = getattr(exc, "sqlite_errorname", "")
    text = str(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return exceptions.StoreBusy(
            "The database is busy (another process holds its write lock); try again"
        )
    if name.startswith("SQLITE_FULL") or "full" in text:
        return exceptions.StoreFull("The disk under the database is full; try again later", 30)
    return exceptions.StoreUnavailable(f"The database failed: {text}")


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _statements(script: str) -> Iterable[str]:
    """The statements of a migration script (triggers included), one by one."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statement = pending.strip()
            pending = ""
            if statement and not all(
                part.strip().startswith("--") or not part.strip() for part in statement.splitlines()
            ):
                yield statement


Outcome = tuple[Any, BaseException | None]


def run_together(conn: sqlite3.Connection, units: Sequence[Unit[Any]]) -> list[Outcome]:
    """Run ``units`` in one transaction, each in a savepoint of its own: a unit that
    raises is undone alone. Returns each unit's (value, error).

    Raises:
        exceptions.StoreUnavailable: the transaction itself failed (the lock was not
            free, the disk is full, SQLite rolled everything back): no unit took effect.
    """
    outcomes: list[Outcome] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        if len(units) == 1:
            # Alone in its transaction, a unit needs no savepoint: its error undoes all.
            try:
                outcomes.append((units[0](conn), None))
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    exc = translate(exc)
                return [(None, exc)]
            conn.execute("COMMIT")
            return [_committed(value, failure) for value, failure in outcomes]
        for unit in units:
            conn.execute("SAVEPOINT unit")
            try:
                value = unit(conn)
            except BaseException as exc:
                if not conn.in_transaction:
                    raise  # SQLite rolled the whole transaction back: the batch goes
                conn.execute("ROLLBACK TO unit")
                conn.execute("RELEASE unit")
                if isinstance(exc, sqlite3.OperationalError):
                    exc = translate(exc)
                outcomes.append((None, exc))
            else:
                conn.execute("RELEASE unit")
                outcomes.append((value, None))
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise translate(exc) from exc
        raise
    return [_committed(value, failure) for value, failure in outcomes]


def _committed(value: Any, failure: BaseException | None) -> Outcome:
    """A unit's outcome once its transaction committed: run what waited for that."""
    if isinstance(value, AfterCommit):
        try:
            value.callback()
        except Exception:
            log.exception("after-commit callback failed")
        value = value.value
    return value, failure


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, exceptions.StoreBusy)


class _Writer:
    """A writing connection on a thread of its own; units queued while it works share a
    transaction. It waits out other processes' locks (busy timeout) off the event loop,
    and does what must not block it: checkpoints, and every commit when each one fsyncs
    (``DB_SYNCHRONOUS=full``)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[
            tuple[Unit[Any], concurrent.futures.Future[Any], bool] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="longdl sqlite writer")
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed = False
        #: Units taken off the queue so far (whether they ran or were dropped).
        self.taken = 0

    async def start(self) -> None:
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    async def stop(self) -> None:
        """Finish every unit already queued, then close the connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    async def run(self, unit: Unit[T], *, transaction: bool = True) -> T:
        """Run ``unit`` on the writing connection, inside a transaction it shares with the
        units queued beside it (``transaction=False``: alone, managing its own)."""
        if self._closed:
            raise exceptions.StoreUnavailable("The store is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((unit, future, transaction))
        # Cancelling the wrapper cancels ``future`` unless the unit already started.
        return await asyncio.wrap_future(future)

    def _serve(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self.taken += len(batch)
                self._execute(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _execute(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[Unit[Any], concurrent.futures.Future[Any], bool]],
    ) -> None:
        shared: list[tuple[Unit[Any], concurrent.futures.Future[Any]]] = []
        for unit, future, transaction in batch:
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started: it never runs
            if transaction:
                shared.append((unit, future))
            else:
                self._alone(conn, unit, future)
        if not shared:
            return
        try:
            outcomes = run_together(conn, [unit for unit, _ in shared])
        except BaseException as exc:
            log.warning("store.write_failed units=%d error=%s", len(shared), exc)
            for _, future in shared:
                future.set_exception(exc)
            return
        for (_, future), (value, failure) in zip(shared, outcomes, strict=True):
            if failure is None:
                future.set_result(value)
            else:
                future.set_exception(failure)

    @staticmethod
    def _alone(
        conn: sqlite3.Connection, unit: Unit[Any], future: concurrent.futures.Future[Any]
    ) -> None:
        try:
            future.set_result(unit(conn))
        except BaseException as exc:
            if conn.in_transaction:
                conn.rollback()
            future.set_exception(exc)


class _LoopWriter:
    """A writing connection used on the event loop's own thread: the units queued during
    one turn of the loop share one transaction, run synchronously at the next turn.

    An SQLite write with ``synchronous=NORMAL`` in WAL mode takes microseconds and never
    fsyncs (checkpoints, which do, run on the thread writer), so running it in place
    costs less than handing it to a thread and back, which is most of a write's time.
    It never waits for a lock: when another process holds the write lock, the batch goes
    to the thread writer, which waits (``DB_BUSY_TIMEOUT_MS``) off the loop. A unit runs
    whole or not at all: its caller cancelled before the batch runs drops it, and a
    running batch has no await a cancel could land in.
    """

    def __init__(self, conn: sqlite3.Connection, fallback: _Writer) -> None:
        self._conn = conn
        self._fallback = fallback
        self._pending: list[tuple[Unit[Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self.commits = 0

    async def run(self, unit: Unit[T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((unit, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        batch = [(unit, future) for unit, future in self._pending if not future.done()]
        self._pending = []
        if not batch:
            return
        try:
            outcomes = run_together(self._conn, [unit for unit, _ in batch])
        except BaseException as exc:
            if _is_busy(exc):
                for unit, future in batch:
                    self._hand_over(unit, future)
                return
            log.warning("store.write_failed units=%d error=%s", len(batch), exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.commits += 1
        for (_, future), (value, failure) in zip(batch, outcomes, strict=True):
            if future.done():
                continue  # cancelled meanwhile: the unit still ran whole
            if failure is None:
                future.set_result(value)
            else:
                future.set_exception(failure)

    def _hand_over(self, unit: Unit[Any], future: asyncio.Future[Any]) -> None:
        """Let the thread writer wait for the lock; its outcome becomes ``future``'s."""
        task = asyncio.ensure_future(self._fallback.run(unit))

        def settle(done: asyncio.Future[Any]) -> None:
            if future.done():
                return
            if done.cancelled():
                future.cancel()
            elif done.exception() is not None:
                future.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                future.set_result(done.result())

        task.add_done_callback(settle)
        # A caller that gives up before the thread takes the unit drops it there too.
        future.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)

    def close(self) -> None:
        self._conn.close()


class _WorkerLocks:
    """Advisory locks proving which workers on this host are alive.

    Each worker holds an exclusive ``flock`` on ``<folder>/<worker_id>.lock`` while it
    runs; the kernel drops it when the process ends, SIGKILL included. A worker whose
    file can be locked by someone else is dead.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._held: dict[str, int] = {}

    def _path(self, worker_id: str) -> Path:
        return self.folder / f"{worker_id}.lock"

    def hold(self, worker_id: str) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._path(worker_id), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._held[worker_id] = fd

    def release(self, worker_id: str) -> None:
        fd = self._held.pop(worker_id, None)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self._path(worker_id).unlink()
        os.close(fd)

    def release_all(self) -> None:
        for worker_id in list(self._held):
            self.release(worker_id)

    def is_alive(self, worker_id: str) -> bool:
        if worker_id in self._held:
            return True
        try:
            fd = os.open(self._path(worker_id), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def forget(self, worker_id: str) -> None:
        """Remove a dead worker's lock file."""
        with contextlib.suppress(OSError):
            self._path(worker_id).unlink()


class SQLiteStore(base.SQLStore):
    """Durable job state in one SQLite file (WAL mode).

    Args:
        path: database file; created with its folder when missing (mode 0600).
        synchronous: ``normal`` (survives a process crash) or ``full`` (a power cut too).
        busy_timeout_ms: how long a write waits for another process's write lock.
        clock: source of epoch seconds, injectable for tests.
        on_connect: called with the writing connection once it is set up (to register
            SQL functions, or trace statements while debugging).
    """

    name = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.time,
        on_connect: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = path
        self._on_connect = on_connect
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._clock = clock
        self._writer: _Writer | None = None
        self._loop_writer: _LoopWriter | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._locks = _WorkerLocks(path.with_name(path.name + "-workers"))

    # --- lifecycle ---------------------------------------------------------------------

    def _connect(self, *, busy_timeout_ms: int, on_loop: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            timeout=busy_timeout_ms / 1000,
            check_same_thread=on_loop,
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash (SIGKILL); FULL also a power cut.
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if on_loop:
            # Checkpoints fsync: the thread writer runs them, never a commit on the loop.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    def _connect_writer(self, *, on_loop: bool = False) -> sqlite3.Connection:
        conn = self._connect(
            busy_timeout_ms=0 if on_loop else self.busy_timeout_ms, on_loop=on_loop
        )
        if self._on_connect is not None:
            self._on_connect(conn)
        return conn

    def _create_private(self) -> None:
        """Create the folder and the file readable by this user only; SQLite gives its
        -wal and -shm files the database file's mode."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", 0o600)

    async def open(self) -> None:
        """Connect, switch to WAL and apply pending migrations."""
        await asyncio.to_thread(self._create_private)
        writer = _Writer(self._connect_writer)
        await writer.start()
        self._writer = writer
        try:
            await writer.run(self._migrate, transaction=False)
            # Reads on the loop: an indexed read of a committed WAL page costs less than a
            # trip to a thread; readers never wait for writers in WAL mode.
            self._reader_conn = self._connect(busy_timeout_ms=READ_BUSY_TIMEOUT_MS, on_loop=True)
            self._reader_conn.execute("PRAGMA query_only = ON")
            if self.synchronous == "normal":
                self._loop_writer = _LoopWriter(self._connect_writer(on_loop=True), writer)
                self._checkpoints = asyncio.create_task(
                    self._checkpoint_loop(), name="longdl sqlite checkpoints"
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            await asyncio.gather(self._checkpoints, return_exceptions=True)
            self._checkpoints = None
        if self._loop_writer is not None:
            self._loop_writer._flush()  # what was queued this turn still lands
            self._loop_writer.close()
            self._loop_writer = None
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        await asyncio.to_thread(self._locks.release_all)

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database now and then, on the thread writer (it fsyncs),
        when the loop writer committed since the last time."""
        done = 0
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            loop_writer, writer = self._loop_writer, self._writer
            if loop_writer is None or writer is None or loop_writer.commits == done:
                continue
            done = loop_writer.commits
            try:
                await writer.run(_checkpoint, transaction=False)
            except Exception as exc:
                log.warning("store.checkpoint_failed error=%r", exc)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Apply pending migrations, each in a transaction that also checks the version
        (processes starting together migrate once)."""
        for migration in migrations("sqlite"):
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version >= migration.number:
                    conn.execute("ROLLBACK")
                    continue
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {migration.number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("store.migrated version=%d name=%s", migration.number, migration.name)

    async def _write(self, unit: Unit[T]) -> T:
        if self._loop_writer is not None:
            return await self._loop_writer.run(unit)
        if self._writer is None:
            raise RuntimeError("store is not open")
        return await self._writer.run(unit)

    def _reader(self) -> sqlite3.Connection:
        if self._reader_conn is None:
            raise RuntimeError("store is not open")
        return self._reader_conn

    async def _read_all(self, name: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        try:
            return self._reader().execute(Q[name], params or {}).fetchall()
        except sqlite3.OperationalError as exc:
            raise translate(exc) from exc

    async def _read_one(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        try:
            return self._reader().execute(Q[name], params or {}).fetchone()
        except sqlite3.OperationalError as exc:
            raise translate(exc) from exc

    async def ping(self) -> None:
        await self._read_one("queued_count")
        await self._write(lambda conn: None)

    async def writer_pragma(self, name: str) -> Any:
        """The value of ``PRAGMA name`` on the writing connection (diagnostics, tests)."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        return await self._write(lambda conn: conn.execute(f"PRAGMA {name}").fetchone()[0])

    async def schema_version(self) -> int:
        row = self._reader().execute("PRAGMA user_version").fetchone()
        return int(row[0]) if row else 0

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
        params = insert_params(new, progress, now)
        key = {"owner": new.owner, "key": idempotency_key}

        def unit(conn: sqlite3.Connection) -> Inserted | AfterCommit[Inserted]:
            if idempotency_key is not None:
                stale = {**key, "stale_before": now - IDEMPOTENCY_TTL_S}
                conn.execute(Q["delete_stale_key"], stale)
                existing = conn.execute(Q["find_key"], key).fetchone()
                if existing is not None:
                    row = conn.execute(Q["get_job"], {"id": existing["job_id"]}).fetchone()
                    return Inserted(row_to_job(row), True, existing["request_hash"])
            counts = conn.execute(Q["insert_counts"], {"client": new.client}).fetchone()
            if limits is not None:
                limits.check(counts["queued"], counts["active"])
            # Claimed by its own insert when nothing else waits.
            claimed = claim if claim is not None and not counts["queued"] else None
            if claimed is not None:
                conn.execute(
                    Q["insert_job_claimed"],
                    {
                        **params,
                        "worker_id": claimed.worker_id,
                        "lease_until": now + claimed.lease_s,
                    },
                )
            else:
                conn.execute(Q["insert_job"], params)
            if idempotency_key is not None:
                conn.execute(
                    Q["insert_key"],
                    {**key, "request_hash": request_hash, "job_id": new.id, "now": now},
                )
            job = _new_job(new, progress, now, claimed)
            if claimed is not None:
                on_claimed = claimed.on_claimed
                return AfterCommit(  # the engine starts it once it is committed
                    Inserted(job, False), lambda: _call_soon(loop, on_claimed, job)
                )
            return Inserted(job, False)

        return await self._write(unit)

    # --- workers and leases ------------------------------------------------------------

    async def register_worker(self, worker: WorkerInfo) -> None:
        await asyncio.to_thread(self._locks.hold, worker.id)
        now = self._clock()
        await self._write(
            lambda conn: conn.execute(
                Q["register_worker"],
                {"id": worker.id, "host": worker.host, "pid": worker.pid, "now": now},
            )
        )

    async def unregister_worker(self, worker_id: str) -> None:
        now = self._clock()
        await self._write(lambda conn: _forget_worker(conn, worker_id, now))
        await asyncio.to_thread(self._locks.release, worker_id)

    async def live_workers(self) -> set[str]:
        ids = [row["id"] for row in await self._read_all("workers")]
        alive = await asyncio.to_thread(lambda: [i for i in ids if self._locks.is_alive(i)])
        return set(alive)

    async def claim(self, worker_id: str, lease_s: float, limit: int) -> list[Job]:
        now = self._clock()
        params = {"now": now, "worker_id": worker_id, "lease_until": now + lease_s, "limit": limit}

        def unit(conn: sqlite3.Connection) -> list[Job]:
            jobs = [row_to_job(row) for row in conn.execute(Q["claim"], params).fetchall()]
            # RETURNING comes in no particular order; start the most urgent first.
            jobs.sort(key=lambda j: (-int(j.priority), j.run_after, j.created_at))
            return jobs

        return await self._write(unit)

    async def heartbeat(
        self, worker_id: str, lease_s: float, progress: Mapping[str, Progress]
    ) -> Heartbeat:
        now = self._clock()
        updates = [
            {
                "id": job_id,
                "worker_id": worker_id,
                "now": now,
                "progress": dump_text_json(p.to_dict()),
            }
            for job_id, p in progress.items()
        ]

        def unit(conn: sqlite3.Connection) -> Heartbeat:
            if updates:
                conn.executemany(Q["save_progress"], updates)
            held = conn.execute(
                Q["renew_leases"], {"worker_id": worker_id, "lease_until": now + lease_s}
            ).fetchall()
            conn.execute(Q["beat"], {"id": worker_id, "now": now})
            return Heartbeat(frozenset(row["id"] for row in held))

        return await self._write(unit)

    async def rescue_stalled(
        self, *, max_stalls: int, ttl_s: float, exclude_worker: str | None = None
    ) -> Rescued:
        ids = [row["id"] for row in await self._read_all("workers")]
        dead = await asyncio.to_thread(
            lambda: [i for i in ids if i != exclude_worker and not self._locks.is_alive(i)]
        )
        now = self._clock()

        def unit(conn: sqlite3.Connection) -> Rescued:
            webhooks_due = 0
            for worker_id in dead:
                conn.execute(Q["drop_leases_of"], {"worker_id": worker_id})
                webhooks_due += _forget_worker(conn, worker_id, now)
            conn.execute(Q["forget_stale_workers"], {"before": now - WORKER_ROW_TTL_S})
            rescued = Rescued(webhooks_due=webhooks_due)
            stalled = conn.execute(
                Q["stalled"], {"now": now, "exclude": exclude_worker or "", "limit": SWEEP_BATCH}
            ).fetchall()
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
                    lost = conn.execute(Q["fail_stalled"], params).fetchone()
                    if lost is not None:
                        rescued.lost.append(row_to_job(lost))
                else:
                    progress = base.requeued_progress(job, "Re-queued: its worker stopped")
                    params = {
                        "id": job.id,
                        "now": now,
                        "progress": dump_text_json(progress.to_dict()),
                    }
                    again = conn.execute(Q["requeue_stalled"], params).fetchone()
                    if again is not None:
                        rescued.requeued.append(row_to_job(again))
            return rescued

        rescued = await self._write(unit)
        for worker_id in dead:
            await asyncio.to_thread(self._locks.forget, worker_id)
        return rescued

    # --- a held job --------------------------------------------------------------------

    async def _held_write(self, name: str, params: dict[str, Any]) -> Job | None:
        params = {"now": self._clock(), **params}

        def unit(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(Q[name], params).fetchone()
            return row_to_job(row) if row else None

        return await self._write(unit)

    async def add_output(self, job_id: str, worker_id: str, key: str) -> bool:
        params = {"id": job_id, "worker_id": worker_id, "key": key}
        return await self._write(
            lambda conn: conn.execute(Q["add_output"], params).fetchone() is not None
        )

    async def release_all(self, worker_id: str, message: str) -> list[str]:
        params = {"worker_id": worker_id, "message": message, "now": self._clock()}
        return await self._write(
            lambda conn: [row["id"] for row in conn.execute(Q["release_all"], params)]
        )

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
        return await self._write(
            lambda conn: [row_to_job(r) for r in conn.execute(Q["expire_due"], params)]
        )

    async def purge(self, retention_s: float, limit: int) -> int:
        now = self._clock()

        def unit(conn: sqlite3.Connection) -> int:
            conn.execute(Q["purge_keys"], {"before": now - IDEMPOTENCY_TTL_S, "limit": limit})
            params = {"before": now - retention_s, "limit": limit}
            return len(conn.execute(Q["purge_jobs"], params).fetchall())

        return await self._write(unit)

    async def claim_trash(self, limit: int, lease_s: float) -> list[TrashItem]:
        now = self._clock()
        params = {"now": now, "lease_until": now + lease_s, "limit": limit}

        def unit(conn: sqlite3.Connection) -> list[TrashItem]:
            rows = conn.execute(Q["claim_trash"], params).fetchall()
            return [TrashItem(row["key"], row["job_id"], row["attempts"]) for row in rows]

        return await self._write(unit)

    async def trash_late_outputs(self, job_id: str, keys: Sequence[str]) -> int:
        now = self._clock()

        def unit(conn: sqlite3.Connection) -> int:
            params = [{"id": job_id, "key": key, "now": now} for key in keys]
            return sum(len(conn.execute(Q["trash_late_output"], p).fetchall()) for p in params)

        return await self._write(unit)

    async def trash_done(self, keys: Sequence[str]) -> None:
        params = [{"key": key} for key in keys]
        await self._write(lambda conn: conn.executemany(Q["trash_done"], params))

    async def trash_retry(self, keys: Sequence[str], delay_s: float) -> None:
        at = self._clock() + delay_s
        params = [{"key": key, "next_attempt_at": at} for key in keys]
        await self._write(lambda conn: conn.executemany(Q["trash_retry"], params))

    # --- webhook deliveries ------------------------------------------------------------

    async def claim_webhook_deliveries(
        self, worker_id: str, limit: int, lease_s: float
    ) -> list[WebhookDelivery]:
        now = self._clock()
        params = {"now": now, "worker_id": worker_id, "lease_until": now + lease_s, "limit": limit}

        def unit(conn: sqlite3.Connection) -> list[WebhookDelivery]:
            rows = conn.execute(Q["claim_webhook_deliveries"], params).fetchall()
            deliveries = [row_to_delivery(row) for row in rows]
            return sorted(deliveries, key=lambda d: (d.created_at, d.id))

        return await self._write(unit)

    async def set_webhook_payload(self, delivery_id: str, payload: str) -> str | None:
        def unit(conn: sqlite3.Connection) -> str | None:
            params = {"id": delivery_id, "payload": payload}
            row = conn.execute(Q["set_webhook_payload"], params).fetchone()
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

        def unit(conn: sqlite3.Connection) -> WebhookDelivery | None:
            row = conn.execute(Q["record_webhook_attempt"], params).fetchone()
            return row_to_delivery(row) if row else None

        return await self._write(unit)


def _forget_worker(conn: sqlite3.Connection, worker_id: str, now: float) -> int:
    """Delete a worker's row (its stop, or a rescue finding it dead), making the webhook
    deliveries it had leased due now: with the row gone, no rescue would find their
    leases, and they would wait for them to run out. How many were made due."""
    params = {"worker_id": worker_id, "now": now}
    due: int = conn.execute(Q["drop_webhook_leases_of"], params).rowcount
    conn.execute(Q["unregister_worker"], {"id": worker_id})
    return due


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[Job], None], job: Job) -> None:
    """Have ``loop`` call ``callback(job)``: from its own thread (the loop writer) without
    the wake-up the thread writer's call needs, a write to the loop's self-pipe."""
    try:
        here = asyncio.get_running_loop() is loop
    except RuntimeError:
        here = False
    if here:
        loop.call_soon(callback, job)
    else:
        loop.call_soon_threadsafe(callback, job)


def _new_job(new: NewJob, progress: Progress, now: float, claim: Claim | None) -> Job:
    """The row an insert wrote, as a Job, without reading it back."""
    return Job(
        id=new.id,
        kind=new.kind,
        status=JobStatus.RUNNING if claim is not None else JobStatus.QUEUED,
        priority=new.priority,
        payload=new.payload,
        attempts=1 if claim is not None else 0,
        max_attempts=new.max_attempts,
        progress=dataclasses.replace(progress),
        created_at=now,
        updated_at=now,
        owner=new.owner,
        client=new.client,
        user_id=new.user_id,
        client_request_id=new.client_request_id,
        callback_url=new.callback_url,
        started_at=now if claim is not None else None,
        run_after=now,
        expires_at=new.expires_at,
        worker_id=claim.worker_id if claim is not None else None,
        lease_expires_at=now + claim.lease_s if claim is not None else None,
    )
