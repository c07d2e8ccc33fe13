"""The job store: SQLite through aiosqlite. The only module that writes SQL.

Timestamps are epoch seconds (REAL). Status changes are guarded in SQL by the
transitions of :mod:`longdl.retry`, so a late writer can never move a job backwards.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from longdl import exceptions, retry
from longdl.models import FINISHED_STATUSES, Job, JobStatus, Priority, Progress

IDEMPOTENCY_TTL_S = 24 * 3600

#: Schema migrations; ``PRAGMA user_version`` is the number applied.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE jobs (
        id                TEXT PRIMARY KEY,
        kind              TEXT NOT NULL,
        status            TEXT NOT NULL,
        priority          INTEGER NOT NULL,
        payload           TEXT NOT NULL,
        attempts          INTEGER NOT NULL DEFAULT 0,
        max_attempts      INTEGER NOT NULL,
        progress          TEXT NOT NULL,
        result            TEXT,
        error             TEXT,
        owner             TEXT NOT NULL DEFAULT '',
        user_id           TEXT,
        client_request_id TEXT,
        callback_url      TEXT,
        created_at        REAL NOT NULL,
        updated_at        REAL NOT NULL,
        started_at        REAL,
        finished_at       REAL,
        run_after         REAL NOT NULL DEFAULT 0,
        expires_at        REAL
    );
    CREATE INDEX jobs_claim ON jobs (priority DESC, run_after, created_at)
        WHERE status = 'queued';
    CREATE INDEX jobs_expiry ON jobs (expires_at)
        WHERE status IN ('completed', 'failed', 'canceled', 'expired');
    CREATE INDEX jobs_owner_history ON jobs (owner, created_at DESC, id DESC);
    CREATE INDEX jobs_active ON jobs (owner, status)
        WHERE status IN ('queued', 'running', 'processing_artifacts');
    CREATE TABLE idempotency_keys (
        owner        TEXT NOT NULL,
        key          TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        created_at   REAL NOT NULL,
        PRIMARY KEY (owner, key)
    );
    CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
    """,
    # 2: who sent the job (API key name, else client address), for per-caller limits even
    # when the service is open and every job has the same owner.
    """
    ALTER TABLE jobs ADD COLUMN client TEXT NOT NULL DEFAULT '';
    DROP INDEX jobs_active;
    CREATE INDEX jobs_client_active ON jobs (client)
        WHERE status IN ('queued', 'running', 'processing_artifacts');
    """,
    # 3: webhook deliveries. The trigger queues one when a job with a callback URL reaches
    # a final status, inside the very statement that writes that status: a process
    # that dies right after the status commit cannot lose the delivery, and every path
    # to a final status (complete, fail, cancel, any future one) is covered.
    """
    CREATE TABLE webhook_deliveries (
        id               TEXT PRIMARY KEY,
        job_id           TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        event_type       TEXT NOT NULL,
        url              TEXT NOT NULL,
        payload          TEXT,
        status           TEXT NOT NULL DEFAULT 'pending',
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        last_error       TEXT,
        last_status_code INTEGER,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        delivered_at     REAL
    );
    CREATE UNIQUE INDEX webhook_deliveries_event ON webhook_deliveries (job_id, event_type);
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
        WHERE status = 'pending';
    CREATE TRIGGER jobs_finished_webhook AFTER UPDATE OF status ON jobs
    WHEN NEW.callback_url IS NOT NULL
         AND NEW.status IN ('completed', 'failed', 'canceled')
         AND OLD.status NOT IN ('completed', 'failed', 'canceled', 'expired')
    BEGIN
        INSERT OR IGNORE INTO webhook_deliveries
            (id, job_id, event_type, url, next_attempt_at, created_at, updated_at)
        VALUES ('msg_' || lower(hex(randomblob(16))), NEW.id, 'job.' || NEW.status,
                NEW.callback_url, NEW.updated_at, NEW.updated_at, NEW.updated_at);
    END;
    """,
)

_JOB_COLUMNS = (
    "id, kind, status, priority, payload, attempts, max_attempts, progress, result, error, "
    "owner, user_id, client_request_id, callback_url, created_at, updated_at, started_at, "
    "finished_at, run_after, expires_at, client"
)

_ACTIVE = ("queued", "running", "processing_artifacts")


def _placeholders(values: Iterable[object]) -> str:
    return ", ".join("?" for _ in values)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _row_to_job(row: aiosqlite.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        status=JobStatus(row["status"]),
        priority=Priority(row["priority"]),
        payload=json.loads(row["payload"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        progress=Progress.from_dict(json.loads(row["progress"])),
        result=_loads(row["result"]),
        error=_loads(row["error"]),
        owner=row["owner"],
        user_id=row["user_id"],
        client_request_id=row["client_request_id"],
        callback_url=row["callback_url"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        run_after=row["run_after"],
        expires_at=row["expires_at"],
        client=row["client"],
    )


@dataclass(frozen=True)
class NewJob:
    """What it takes to insert a job."""

    id: str
    kind: str
    payload: dict[str, Any]
    max_attempts: int
    priority: Priority = Priority.NORMAL
    owner: str = ""
    client: str = ""
    user_id: str | None = None
    client_request_id: str | None = None
    callback_url: str | None = None
    expires_at: float | None = None
    progress: Progress | None = None


@dataclass(frozen=True)
class Limits:
    """Back-pressure checked in the same transaction as the insert, so bursts cannot
    overshoot them."""

    max_queued: int
    max_active_per_client: int
    queued_retry_after_s: int = 30
    active_retry_after_s: int = 10


@dataclass(frozen=True)
class Inserted:
    """Result of :meth:`Store.insert_job`: the job, and whether it already existed."""

    job: Job
    replayed: bool


DeliveryStatus = Literal["pending", "delivered", "failed"]

_DELIVERY_COLUMNS = (
    "id, job_id, event_type, url, payload, status, attempts, next_attempt_at, last_error, "
    "last_status_code, created_at, updated_at, delivered_at"
)


@dataclass(frozen=True)
class WebhookDelivery:
    """One row of webhook_deliveries: a finished job's event for its callback URL."""

    #: Also the ``webhook-id`` header: the same on every attempt.
    id: str
    job_id: str
    #: ``job.completed``, ``job.failed`` or ``job.canceled``.
    event_type: str
    url: str
    #: The body, kept at the first attempt so retries send the same bytes.
    payload: str | None
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float
    last_error: str | None
    last_status_code: int | None
    created_at: float
    updated_at: float
    delivered_at: float | None


def _row_to_delivery(row: aiosqlite.Row) -> WebhookDelivery:
    return WebhookDelivery(**{key: row[key] for key in row.keys()})  # noqa: SIM118


class Store:
    """Durable job state in one SQLite file (WAL mode).

    Args:
        path: database file; created with its folder when missing.
        clock: source of epoch seconds, injectable for tests.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        # Multi-statement transactions share the single connection; this keeps other
        # coroutines' statements out of them.
        self._tx_lock = asyncio.Lock()

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, switch to WAL and apply pending migrations."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash (SIGKILL); only power loss can
        # drop the last commits.
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA busy_timeout = 5000")
        self._db = db
        await self._migrate()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            async with self._tx_lock:
                await self.db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
                )

    async def schema_version(self) -> int:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def ping(self) -> None:
        """Raise if the database cannot answer a query."""
        async with self.db.execute("SELECT 1") as cur:
            await cur.fetchone()

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        """Run one writing statement outside anyone else's transaction; return its rows."""
        async with self._tx_lock, self.db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def _write_job(self, sql: str, params: Sequence[Any]) -> Job | None:
        rows = await self._write(sql, params)
        return _row_to_job(rows[0]) if rows else None

    # --- reads -------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        async with self.db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
        ) as cur:
            row = await cur.fetchone()
        return _row_to_job(row) if row else None

    async def find_idempotent(self, owner: str, key: str) -> Inserted | None:
        """The live job an idempotency key names, with the stored request hash."""
        async with self.db.execute(
            "SELECT job_id, request_hash FROM idempotency_keys "
            "WHERE owner = ? AND key = ? AND created_at >= ?",
            (owner, key, self._clock() - IDEMPOTENCY_TTL_S),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        job = await self.get_job(row["job_id"])
        if job is None:
            return None
        job.extra["request_hash"] = row["request_hash"]
        return Inserted(job, replayed=True)

    async def count_queued(self) -> int:
        async with self.db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def count_active(self, client: str) -> int:
        """Unfinished jobs of one caller."""
        async with self.db.execute(
            f"SELECT count(*) FROM jobs WHERE client = ? AND status IN ({_placeholders(_ACTIVE)})",
            (client, *_ACTIVE),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def count_by_status(self) -> dict[JobStatus, int]:
        async with self.db.execute("SELECT status, count(*) FROM jobs GROUP BY status") as cur:
            rows = await cur.fetchall()
        counts = dict.fromkeys(JobStatus, 0)
        for status, count in rows:
            counts[JobStatus(status)] = int(count)
        return counts

    async def next_run_after(self) -> float | None:
        """Earliest time a queued job becomes claimable, or None when none is queued."""
        async with self.db.execute(
            "SELECT min(run_after) FROM jobs WHERE status = 'queued'"
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def list_jobs(
        self,
        *,
        owner: str,
        user_id: str | None = None,
        statuses: Sequence[JobStatus] = (),
        limit: int = 20,
        before: tuple[float, str] | None = None,
    ) -> list[Job]:
        """A caller's jobs, newest first, strictly older than ``before`` when given."""
        where = ["owner = ?"]
        params: list[Any] = [owner]
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if statuses:
            where.append(f"status IN ({_placeholders(statuses)})")
            params.extend(s.value for s in statuses)
        if before is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend([before[0], before[0], before[1]])
        params.append(limit)
        sql = (
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [_row_to_job(r) for r in rows]

    # --- writes ------------------------------------------------------------------------

    async def insert_job(
        self,
        new: NewJob,
        *,
        idempotency_key: str | None = None,
        request_hash: str = "",
        limits: Limits | None = None,
    ) -> Inserted:
        """Insert a queued job, or return the job an idempotency key already names.

        The key's uniqueness is a primary key and the whole check-and-insert runs in one
        ``BEGIN IMMEDIATE`` transaction, so concurrent requests with one key make one job.
        A replay is returned even when the limits are reached: it creates nothing.

        Raises:
            exceptions.Overloaded: ``limits.max_queued`` jobs are already waiting.
            exceptions.TooManyActiveJobs: the client has ``limits.max_active_per_client``
                unfinished jobs.
        """
        now = self._clock()
        progress = new.progress or Progress()
        async with self._tx_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency_key is not None:
                    await self.db.execute(
                        "DELETE FROM idempotency_keys WHERE owner = ? AND key = ? "
                        "AND created_at < ?",
                        (new.owner, idempotency_key, now - IDEMPOTENCY_TTL_S),
                    )
                    async with self.db.execute(
                        "SELECT job_id, request_hash FROM idempotency_keys "
                        "WHERE owner = ? AND key = ?",
                        (new.owner, idempotency_key),
                    ) as cur:
                        existing = await cur.fetchone()
                    if existing is not None:
                        await self.db.execute("COMMIT")
                        job = await self.get_job(existing["job_id"])
                        assert job is not None  # cascaded delete removes the key too
                        job.extra["request_hash"] = existing["request_hash"]
                        return Inserted(job, replayed=True)
                if limits is not None:
                    await self._check_limits(new.client, limits)
                await self.db.execute(
                    f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES "
                    f"({_placeholders(_JOB_COLUMNS.split(','))})",
                    (
                        new.id,
                        new.kind,
                        JobStatus.QUEUED.value,
                        int(new.priority),
                        _dumps(new.payload),
                        0,
                        new.max_attempts,
                        _dumps(progress.to_dict()),
                        None,
                        None,
                        new.owner,
                        new.user_id,
                        new.client_request_id,
                        new.callback_url,
                        now,
                        now,
                        None,
                        None,
                        now,
                        new.expires_at,
                        new.client,
                    ),
                )
                if idempotency_key is not None:
                    await self.db.execute(
                        "INSERT INTO idempotency_keys (owner, key, request_hash, job_id, "
                        "created_at) VALUES (?, ?, ?, ?, ?)",
                        (new.owner, idempotency_key, request_hash, new.id, now),
                    )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        job = await self.get_job(new.id)
        assert job is not None
        return Inserted(job, replayed=False)

    async def _check_limits(self, client: str, limits: Limits) -> None:
        """Raise if a new job would exceed ``limits``; runs inside the insert transaction."""
        if await self.count_queued() >= limits.max_queued:
            raise exceptions.Overloaded(
                "Too many jobs are waiting; try again later", limits.queued_retry_after_s
            )
        if await self.count_active(client) >= limits.max_active_per_client:
            raise exceptions.TooManyActiveJobs(
                f"At most {limits.max_active_per_client} unfinished jobs per caller",
                limits.active_retry_after_s,
            )

    async def claim_next(self) -> Job | None:
        """Move the most urgent claimable queued job to running and return it.

        Order: priority (high first), then ``run_after``, then age.
        """
        now = self._clock()
        return await self._write_job(
            f"""
            UPDATE jobs SET status = 'running', attempts = attempts + 1,
                   started_at = ?, updated_at = ?
             WHERE id = (SELECT id FROM jobs
                          WHERE status = 'queued' AND run_after <= ?
                          ORDER BY priority DESC, run_after, created_at
                          LIMIT 1)
            RETURNING {_JOB_COLUMNS}
            """,
            (now, now, now),
        )

    async def _transition(self, job_id: str, new: JobStatus, sets: dict[str, Any]) -> Job | None:
        """Move a job to ``new`` if the transition is allowed from its current status."""
        sources = retry.sources_of(new)
        sets = {"status": new.value, "updated_at": self._clock(), **sets}
        assignments = ", ".join(f"{column} = ?" for column in sets)
        return await self._write_job(
            f"UPDATE jobs SET {assignments} WHERE id = ? "
            f"AND status IN ({_placeholders(sources)}) RETURNING {_JOB_COLUMNS}",
            (*sets.values(), job_id, *(s.value for s in sources)),
        )

    async def save_progress(
        self, job_id: str, progress: Progress, status: JobStatus | None = None
    ) -> None:
        """Write progress (and a move to processing_artifacts) of a running job."""
        sets = "progress = ?, updated_at = ?"
        params: list[Any] = [_dumps(progress.to_dict()), self._clock()]
        if status is not None:
            sets += ", status = ?"
            params.append(status.value)
        await self._write(
            f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ('running', "
            "'processing_artifacts')",
            (*params, job_id),
        )

    async def complete(
        self, job_id: str, result: dict[str, Any], progress: Progress, ttl_s: float
    ) -> Job | None:
        now = self._clock()
        return await self._transition(
            job_id,
            JobStatus.COMPLETED,
            {
                "result": _dumps(result),
                "error": None,
                "progress": _dumps(progress.to_dict()),
                "finished_at": now,
                "expires_at": now + ttl_s,
            },
        )

    async def fail(
        self, job_id: str, error: dict[str, Any], progress: Progress, ttl_s: float
    ) -> Job | None:
        now = self._clock()
        return await self._transition(
            job_id,
            JobStatus.FAILED,
            {
                "error": _dumps(error),
                "progress": _dumps(progress.to_dict()),
                "finished_at": now,
                "expires_at": now + ttl_s,
            },
        )

    async def cancel(self, job_id: str, ttl_s: float, message: str) -> Job | None:
        """Cancel a job that has not finished; None if it has (or does not exist)."""
        now = self._clock()
        job = await self.get_job(job_id)
        if job is None or job.status.finished:
            return None
        job.progress.message = message
        return await self._transition(
            job_id,
            JobStatus.CANCELED,
            {
                "error": _dumps({"code": "CANCELED", "message": message, "retryable": False}),
                "progress": _dumps(job.progress.to_dict()),
                "finished_at": now,
                "expires_at": now + ttl_s,
            },
        )

    async def retry_later(
        self, job_id: str, delay_s: float, error: dict[str, Any], progress: Progress
    ) -> Job | None:
        """Send a failed attempt back to the queue, claimable after ``delay_s``."""
        return await self._transition(
            job_id,
            JobStatus.QUEUED,
            {
                "run_after": self._clock() + delay_s,
                "error": _dumps(error),
                "progress": _dumps(progress.to_dict()),
            },
        )

    async def requeue(self, job_id: str, message: str) -> Job | None:
        """Put an interrupted job back in the queue without using up its attempt."""
        now = self._clock()
        job = await self.get_job(job_id)
        if job is None:
            return None
        progress = Progress(files_total=job.progress.files_total, message=message)
        return await self._write_job(
            "UPDATE jobs SET status = 'queued', attempts = max(attempts - 1, 0), "
            "run_after = ?, updated_at = ?, progress = ? "
            "WHERE id = ? AND status IN ('running', 'processing_artifacts') "
            f"RETURNING {_JOB_COLUMNS}",
            (now, now, _dumps(progress.to_dict()), job_id),
        )

    async def recover_interrupted(self, message: str) -> list[str]:
        """Re-queue every job a dead process left running; return their ids."""
        async with self.db.execute(
            "SELECT id FROM jobs WHERE status IN ('running', 'processing_artifacts')"
        ) as cur:
            ids = [row["id"] for row in await cur.fetchall()]
        for job_id in ids:
            await self.requeue(job_id, message)
        return ids

    async def due_for_expiry(self, limit: int = 100) -> list[Job]:
        """Finished jobs whose TTL has passed, oldest first."""
        async with self.db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ('completed', 'failed', "
            "'canceled') AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (self._clock(), limit),
        ) as cur:
            rows = await cur.fetchall()
        return [_row_to_job(r) for r in rows]

    async def expire(self, job_id: str) -> Job | None:
        return await self._transition(job_id, JobStatus.EXPIRED, {})

    async def purge(self, retention_s: float) -> int:
        """Delete rows of jobs expired more than ``retention_s`` ago, and old keys."""
        now = self._clock()
        await self._write(
            "DELETE FROM idempotency_keys WHERE created_at < ?", (now - IDEMPOTENCY_TTL_S,)
        )
        rows = await self._write(
            "DELETE FROM jobs WHERE status = 'expired' AND expires_at < ? RETURNING id",
            (now - retention_s,),
        )
        return len(rows)

    # --- webhook deliveries ------------------------------------------------------------

    async def due_webhook_deliveries(
        self, limit: int, exclude: Collection[str] = ()
    ) -> list[WebhookDelivery]:
        """Pending deliveries whose next attempt is due, oldest due first.

        Args:
            limit: at most this many.
            exclude: ids already in flight in this process.
        """
        not_in = f"AND id NOT IN ({_placeholders(exclude)})" if exclude else ""
        async with self.db.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries "
            f"WHERE status = 'pending' AND next_attempt_at <= ? {not_in} "
            "ORDER BY next_attempt_at LIMIT ?",
            (self._clock(), *exclude, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [_row_to_delivery(r) for r in rows]

    async def next_webhook_attempt_at(self, exclude: Collection[str] = ()) -> float | None:
        """When the earliest pending delivery not in ``exclude`` is due; None if none."""
        not_in = f"AND id NOT IN ({_placeholders(exclude)})" if exclude else ""
        async with self.db.execute(
            "SELECT min(next_attempt_at) FROM webhook_deliveries "
            f"WHERE status = 'pending' {not_in}",
            tuple(exclude),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def webhook_deliveries_of(self, job_id: str) -> list[WebhookDelivery]:
        """Every delivery of one job, oldest first."""
        async with self.db.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE job_id = ? "
            "ORDER BY created_at, id",
            (job_id,),
        ) as cur:
            rows = await cur.fetchall()
        return [_row_to_delivery(r) for r in rows]

    async def set_webhook_payload(self, delivery_id: str, payload: str) -> str | None:
        """Keep the body of a delivery, unless one is kept already; return the kept one.

        Retries then send the very bytes of the first attempt.
        """
        rows = await self._write(
            "UPDATE webhook_deliveries SET payload = coalesce(payload, ?) WHERE id = ? "
            "RETURNING payload",
            (payload, delivery_id),
        )
        return str(rows[0]["payload"]) if rows else None

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
        """Write the outcome of an attempt to a pending delivery.

        Args:
            status: ``pending`` (retry at ``next_attempt_at``), ``delivered`` or ``failed``.
            attempted: whether a request was sent (counts as an attempt).
            error: why it did not succeed.
            status_code: the receiver's answer, when there was one.
        """
        now = self._clock()
        rows = await self._write(
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + ?, "
            "next_attempt_at = coalesce(?, next_attempt_at), last_error = ?, "
            "last_status_code = coalesce(?, last_status_code), updated_at = ?, "
            "delivered_at = CASE WHEN ? = 'delivered' THEN ? END "
            f"WHERE id = ? AND status = 'pending' RETURNING {_DELIVERY_COLUMNS}",
            (
                status,
                int(attempted),
                next_attempt_at,
                error,
                status_code,
                now,
                status,
                now,
                delivery_id,
            ),
        )
        return _row_to_delivery(rows[0]) if rows else None

    async def count_webhook_deliveries(self) -> dict[str, int]:
        """Deliveries by status (pending, delivered, failed)."""
        async with self.db.execute(
            "SELECT status, count(*) FROM webhook_deliveries GROUP BY status"
        ) as cur:
            rows = await cur.fetchall()
        counts = dict.fromkeys(("pending", "delivered", "failed"), 0)
        counts.update({str(status): int(count) for status, count in rows})
        return counts


__all__ = ["FINISHED_STATUSES", "Inserted", "Limits", "NewJob", "Store"]
