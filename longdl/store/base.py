"""The store interface every backend implements, and the records it hands out.

A store keeps jobs, idempotency keys, workers and their leases, webhook deliveries and
the trash (objects to delete). Every method is one transaction that runs whole or not at
all, whatever happens to the awaiting coroutine: a cancelled caller may not learn the
outcome, but it never leaves a transaction open or half a change behind.

Writes of a running job name the worker that holds it (``worker_id``) and only land
while that worker still holds the job's lease: a worker that lost its job (another
process re-queued it after the lease ran out, or a caller canceled it) cannot overwrite
what happened since.

Raises (from any writing method):
    exceptions.StoreBusy: another process held the write lock too long.
    exceptions.StoreFull: the disk under the database is full.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import orjson

from longdl import exceptions
from longdl.models import Job, JobStatus, Priority, Progress

T = TypeVar("T")

#: Idempotency keys replay their job for this long.
IDEMPOTENCY_TTL_S = 24 * 3600

#: Statuses of a job some worker holds.
HELD_STATUSES = (JobStatus.RUNNING, JobStatus.PROCESSING_ARTIFACTS)
#: Statuses that count against a caller's MAX_ACTIVE_PER_USER.
ACTIVE_STATUSES = (JobStatus.QUEUED, *HELD_STATUSES)

#: The error of a job whose worker kept dying under it.
WORKER_LOST = "WORKER_LOST"


def dump_json(value: Any) -> str | None:
    """The JSON text a store keeps for ``value`` (compact; None stays NULL)."""
    return None if value is None else orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def dump_text_json(value: Any) -> str | None:
    """:func:`dump_json` of what a job says to people (its progress, result, error), with
    any NUL character shown as U+FFFD: PostgreSQL's jsonb cannot hold NUL, and a final
    write it refuses would be retried for ever. Both stores keep the same text."""
    text = dump_json(value)
    if text is None or "\\u0000" not in text:
        return text
    return dump_json(_without_nul(value))


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def row_to_job(row: Mapping[str, Any]) -> Job:
    """A jobs row as a :class:`Job`."""
    return Job(
        id=row["id"],
        kind=row["kind"],
        status=JobStatus(row["status"]),
        priority=Priority(row["priority"]),
        payload=orjson.loads(row["payload"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        progress=Progress.from_dict(orjson.loads(row["progress"])),
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
        worker_id=row["worker_id"],
        lease_expires_at=row["lease_expires_at"],
        stalls=row["stalls"],
    )


_DELIVERY_FIELDS = (
    "id",
    "job_id",
    "event_type",
    "url",
    "payload",
    "status",
    "attempts",
    "next_attempt_at",
    "last_error",
    "last_status_code",
    "created_at",
    "updated_at",
    "delivered_at",
)


def row_to_delivery(row: Mapping[str, Any]) -> WebhookDelivery:
    return WebhookDelivery(**{name: row[name] for name in _DELIVERY_FIELDS})


def insert_params(new: NewJob, progress: Progress, now: float) -> dict[str, Any]:
    """The parameters an SQL store's insert of ``new`` takes, as of ``now``."""
    return {
        "id": new.id,
        "kind": new.kind,
        "priority": int(new.priority),
        "payload": dump_json(new.payload),
        "max_attempts": new.max_attempts,
        "progress": dump_text_json(progress.to_dict()),
        "owner": new.owner,
        "client": new.client,
        "user_id": new.user_id,
        "client_request_id": new.client_request_id,
        "callback_url": new.callback_url,
        "now": now,
        "expires_at": new.expires_at,
    }


def requeued_progress(job: Job, message: str) -> Progress:
    """The progress of a job going back to the queue: reset, saying why."""
    return Progress(files_total=job.progress.files_total, message=message)


def worker_lost(job: Job) -> tuple[dict[str, Any], Progress]:
    """The error and progress of a job failed for losing its worker once too often."""
    stalls = job.stalls + 1
    message = (
        f"The job stopped {stalls} times because the process running it died or lost "
        "contact (for example out of memory); it was not run again"
    )
    error = {"code": WORKER_LOST, "message": message, "retryable": False}
    return error, Progress(
        percent=job.progress.percent, message=message, files_total=job.progress.files_total
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

    def check(self, queued: int, active: int) -> None:
        """Raise if a new job would exceed the limits, given the jobs waiting and the
        caller's unfinished ones."""
        if queued >= self.max_queued:
            raise exceptions.Overloaded(
                "Too many jobs are waiting; try again later", self.queued_retry_after_s
            )
        if active >= self.max_active_per_client:
            raise exceptions.TooManyActiveJobs(
                f"At most {self.max_active_per_client} unfinished jobs per caller",
                self.active_retry_after_s,
            )


@dataclass(frozen=True)
class Inserted:
    """Result of :meth:`Store.insert_job`: the job, and whether it already existed."""

    job: Job
    replayed: bool
    #: The request hash stored with the idempotency key (replays only).
    request_hash: str | None = None


@dataclass(frozen=True)
class Claim:
    """Claim a new job at once for ``worker_id`` (see :meth:`Store.insert_job`)."""

    worker_id: str
    lease_s: float
    #: Called on the event loop with the claimed job once it is committed.
    on_claimed: Callable[[Job], None]


@dataclass(frozen=True)
class AfterCommit(Generic[T]):
    """What a unit returns to have ``callback`` run once its transaction committed (and
    only then); callers get ``value``."""

    value: T
    callback: Callable[[], object]


@dataclass(frozen=True)
class WorkerInfo:
    """A running longdl process, as the workers table records it."""

    id: str
    host: str
    pid: int


#: The status a change notification carries, with no job id, when webhook deliveries
#: became due without a job changing.
WEBHOOKS_DUE = "webhooks_due"


@dataclass(frozen=True)
class Rescued:
    """What one stall sweep did to jobs whose worker stopped renewing their lease."""

    #: Re-queued to run again (one stall more each).
    requeued: list[Job] = field(default_factory=list)
    #: Failed with WORKER_LOST: they stalled MAX_STALLS times.
    lost: list[Job] = field(default_factory=list)
    #: Webhook deliveries the dead workers had in flight, due again now.
    webhooks_due: int = 0


@dataclass(frozen=True)
class Heartbeat:
    """Answer to :meth:`Store.heartbeat`: which jobs the worker still holds."""

    held: frozenset[str]


@dataclass(frozen=True)
class TrashItem:
    """An object to delete from storage (an expired or abandoned artifact)."""

    key: str
    job_id: str | None
    attempts: int


DeliveryStatus = Literal["pending", "delivered", "failed"]


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


class Store(abc.ABC):
    """Durable job state. One instance per process; open it before use."""

    #: Backend name for logs, /health and /metrics.
    name: str = "store"

    # --- lifecycle ---------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Wait for writes in flight, then disconnect."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise unless the database answers reads and takes writes."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """Number of the last migration applied."""

    # --- reads -------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> Job | None:
        """The committed state of one job."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        *,
        owner: str,
        client: str | None = None,
        user_id: str | None = None,
        statuses: Sequence[JobStatus] = (),
        limit: int = 20,
        before: tuple[float, str] | None = None,
    ) -> list[Job]:
        """An owner's jobs (only those ``client`` sent, when given), newest first,
        strictly older than ``before`` (created_at, id) when given."""

    @abc.abstractmethod
    async def count_by_status(self) -> dict[JobStatus, int]:
        """Jobs by status; kept counts, not a scan."""

    @abc.abstractmethod
    async def next_run_after(self) -> float | None:
        """Earliest time a queued job becomes claimable, or None when none is queued."""

    # --- submitting --------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_job(
        self,
        new: NewJob,
        *,
        idempotency_key: str | None = None,
        request_hash: str = "",
        limits: Limits | None = None,
        claim: Claim | None = None,
    ) -> Inserted:
        """Insert a queued job, or return the job an idempotency key already names.

        Committed before it returns. A replay is returned even when the limits are
        reached: it creates nothing. With ``claim``, when no other job is waiting, the
        job is inserted already claimed by that worker (one transaction instead of two,
        no trip through the queue) and ``claim.on_claimed`` is called with it on the event
        loop as soon as it is committed, whatever happens to the caller meanwhile.

        Raises:
            exceptions.Overloaded: ``limits.max_queued`` jobs are already waiting.
            exceptions.TooManyActiveJobs: the client has ``limits.max_active_per_client``
                unfinished jobs.
        """

    # --- workers and leases ------------------------------------------------------------

    @abc.abstractmethod
    async def register_worker(self, worker: WorkerInfo) -> None:
        """Record a starting process; its jobs are leased in its name."""

    @abc.abstractmethod
    async def unregister_worker(self, worker_id: str) -> None:
        """Forget a process that stopped cleanly (after it released its jobs)."""

    @abc.abstractmethod
    async def live_workers(self) -> set[str]:
        """Ids of the processes that are alive now (by heartbeat, or better evidence)."""

    @abc.abstractmethod
    async def claim(self, worker_id: str, lease_s: float, limit: int) -> list[Job]:
        """Move up to ``limit`` claimable queued jobs to running, leased to ``worker_id``
        for ``lease_s``, most urgent first: priority (high first), ``run_after``, age."""

    @abc.abstractmethod
    async def heartbeat(
        self, worker_id: str, lease_s: float, progress: Mapping[str, Progress]
    ) -> Heartbeat:
        """Write the progress of running jobs and renew every lease ``worker_id`` holds,
        in one transaction; say which jobs it still holds."""

    @abc.abstractmethod
    async def rescue_stalled(
        self, *, max_stalls: int, ttl_s: float, exclude_worker: str | None = None
    ) -> Rescued:
        """Re-queue held jobs whose lease ran out (one stall more), or fail them with
        WORKER_LOST at ``max_stalls``; jobs of dead workers first lose their lease."""

    # --- a held job (guarded by its worker) --------------------------------------------

    @abc.abstractmethod
    async def set_status(
        self, job_id: str, worker_id: str, status: JobStatus, progress: Progress
    ) -> Job | None:
        """Move a held job to another held status (``processing_artifacts``)."""

    @abc.abstractmethod
    async def add_output(self, job_id: str, worker_id: str, key: str) -> bool:
        """Note that the job is about to write ``key``: if the job ends without it as its
        result, the key goes to the trash (crash-safe: noted before the write). False,
        noting nothing, when the worker no longer holds the job (canceled, taken over):
        it must not write the key, which nothing would ever delete."""

    @abc.abstractmethod
    async def complete(
        self,
        job_id: str,
        worker_id: str,
        result: dict[str, Any],
        progress: Progress,
        ttl_s: float,
    ) -> Job | None:
        """Finish a held job with its result; None if the worker no longer holds it."""

    @abc.abstractmethod
    async def fail(
        self,
        job_id: str,
        worker_id: str,
        error: dict[str, Any],
        progress: Progress,
        ttl_s: float,
    ) -> Job | None:
        """Fail a held job for good; None if the worker no longer holds it."""

    @abc.abstractmethod
    async def retry_later(
        self,
        job_id: str,
        worker_id: str,
        delay_s: float,
        error: dict[str, Any],
        progress: Progress,
    ) -> Job | None:
        """Send a failed attempt back to the queue, claimable after ``delay_s``."""

    @abc.abstractmethod
    async def release(self, job_id: str, worker_id: str, progress: Progress) -> Job | None:
        """Give a held job back to the queue without using up its attempt or counting a
        stall (a graceful shutdown)."""

    @abc.abstractmethod
    async def release_all(self, worker_id: str, message: str) -> list[str]:
        """Give back to the queue every job ``worker_id`` still holds (as :meth:`release`
        does), for a worker stopping cleanly; return their ids. A claim that committed
        while its caller was being cancelled leaves such a job."""

    # --- anyone ------------------------------------------------------------------------

    @abc.abstractmethod
    async def cancel(self, job_id: str, ttl_s: float, message: str) -> Job | None:
        """Cancel a job that has not finished; None if it has (or does not exist)."""

    # --- maintenance -------------------------------------------------------------------

    @abc.abstractmethod
    async def expire_due(self, limit: int) -> list[Job]:
        """Expire up to ``limit`` finished jobs past their TTL, oldest first: the row
        becomes ``expired`` and an owned artifact goes to the trash, in one transaction."""

    @abc.abstractmethod
    async def purge(self, retention_s: float, limit: int) -> int:
        """Delete up to ``limit`` rows of jobs expired more than ``retention_s`` ago (with
        their deliveries), and stale idempotency keys; return the jobs deleted."""

    @abc.abstractmethod
    async def claim_trash(self, limit: int, lease_s: float) -> list[TrashItem]:
        """Objects whose deletion is due, taken for ``lease_s`` (no one else gets them
        meanwhile; if the deleter dies, they come due again)."""

    @abc.abstractmethod
    async def trash_late_outputs(self, job_id: str, keys: Sequence[str]) -> int:
        """Put ``keys`` in the trash, due now, if the job has finished and none of them is
        its result; return how many went in.

        For a run whose final write was refused: it wrote them after the job ended,
        maybe after the job's end put them in the trash and the trash was emptied, so
        they would stay forever. A job not finished yet keeps them in its outputs, and
        its end trashes them."""

    @abc.abstractmethod
    async def trash_done(self, keys: Sequence[str]) -> None:
        """Forget trash items whose objects were deleted."""

    @abc.abstractmethod
    async def trash_retry(self, keys: Sequence[str], delay_s: float) -> None:
        """Try these deletions again after ``delay_s``."""

    async def compact(self) -> None:  # noqa: B027 - optional housekeeping
        """Housekeeping the backend needs now and then (PostgreSQL folds count deltas)."""

    # --- changes made elsewhere --------------------------------------------------------

    def add_change_listener(  # noqa: B027 - optional: SQLite has no notifications
        self,
        on_change: Callable[[str, str], None],
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        """Call ``on_change(job_id, status)`` for every change another process commits
        (and this one's too), and ``on_reconnect()`` when changes may have been missed.
        ``on_change("", WEBHOOKS_DUE)`` says webhook deliveries became due with no job
        changing (a process stopped with attempts in flight).

        Backends without notifications never call them: processes sharing an SQLite
        file find each other's work by polling.
        """

    # --- webhook deliveries ------------------------------------------------------------

    @abc.abstractmethod
    async def claim_webhook_deliveries(
        self, worker_id: str, limit: int, lease_s: float
    ) -> list[WebhookDelivery]:
        """Pending deliveries whose next attempt is due and that no live worker is
        sending, oldest due first, leased to ``worker_id`` for ``lease_s``."""

    @abc.abstractmethod
    async def next_webhook_attempt_at(self) -> float | None:
        """When the earliest pending delivery (not leased) is due; None if none."""

    @abc.abstractmethod
    async def webhook_deliveries_of(self, job_id: str) -> list[WebhookDelivery]:
        """Every delivery of one job, oldest first."""

    @abc.abstractmethod
    async def set_webhook_payload(self, delivery_id: str, payload: str) -> str | None:
        """Keep the body of a delivery, unless one is kept already; return the kept one."""

    @abc.abstractmethod
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
        """Write the outcome of an attempt to a pending delivery and release its lease.

        Args:
            status: ``pending`` (retry at ``next_attempt_at``), ``delivered`` or ``failed``.
            attempted: whether a request was sent (counts as an attempt).
            error: why it did not succeed.
            status_code: the receiver's answer, when there was one.
        """

    @abc.abstractmethod
    async def count_webhook_deliveries(self) -> dict[str, int]:
        """Deliveries by status (pending, delivered, failed)."""


class SQLStore(Store):
    """What the SQL backends share: each write of a held job is one named statement,
    guarded by its worker, that returns the job's new row (none if the worker no
    longer holds it). A backend runs such a statement in :meth:`_held_write`."""

    _clock: Callable[[], float]

    @abc.abstractmethod
    async def _held_write(self, name: str, params: dict[str, Any]) -> Job | None:
        """Run statement ``name`` with ``params`` (plus ``now``, unless given) as one
        write; the job it returned, or None."""

    @abc.abstractmethod
    async def _read_all(self, name: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """The rows of read statement ``name`` with ``params``."""

    @abc.abstractmethod
    async def _read_one(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """The first row of read statement ``name`` with ``params``, or None."""

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._read_one("get_job", {"id": job_id})
        return row_to_job(row) if row else None

    async def list_jobs(
        self,
        *,
        owner: str,
        client: str | None = None,
        user_id: str | None = None,
        statuses: Sequence[JobStatus] = (),
        limit: int = 20,
        before: tuple[float, str] | None = None,
    ) -> list[Job]:
        params: dict[str, Any] = {
            "owner": owner,
            "client": owner if client is None else client,
            "user_id": user_id,
            "statuses": dump_json([s.value for s in statuses]) if statuses else None,
            "limit": limit,
        }
        name = "list_jobs"
        if before is not None:
            name = "list_jobs_before"
            params["before_at"], params["before_id"] = before
        return [row_to_job(row) for row in await self._read_all(name, params)]

    async def count_by_status(self) -> dict[JobStatus, int]:
        counts = dict.fromkeys(JobStatus, 0)
        for row in await self._read_all("count_by_status"):
            counts[JobStatus(row["status"])] = int(row["n"])
        return counts

    async def next_run_after(self) -> float | None:
        row = await self._read_one("next_run_after")
        return None if row is None or row[0] is None else float(row[0])

    async def next_webhook_attempt_at(self) -> float | None:
        row = await self._read_one("next_webhook_attempt_at")
        return None if row is None else float(row[0])

    async def webhook_deliveries_of(self, job_id: str) -> list[WebhookDelivery]:
        rows = await self._read_all("webhook_deliveries_of", {"job_id": job_id})
        return [row_to_delivery(row) for row in rows]

    async def count_webhook_deliveries(self) -> dict[str, int]:
        counts = dict.fromkeys(("pending", "delivered", "failed"), 0)
        for row in await self._read_all("count_webhook_deliveries"):
            counts[str(row["status"])] = int(row["n"])
        return counts

    async def _write_as_holder(
        self, name: str, job_id: str, worker_id: str, progress: Progress, **fields: Any
    ) -> Job | None:
        """:meth:`_held_write` of statement ``name`` on the job ``worker_id`` holds, with
        its progress and the statement's other ``fields``."""
        params = {
            "id": job_id,
            "worker_id": worker_id,
            "progress": dump_text_json(progress.to_dict()),
        }
        return await self._held_write(name, {**params, **fields})

    async def set_status(
        self, job_id: str, worker_id: str, status: JobStatus, progress: Progress
    ) -> Job | None:
        return await self._write_as_holder(
            "set_status", job_id, worker_id, progress, status=status.value
        )

    async def complete(
        self,
        job_id: str,
        worker_id: str,
        result: dict[str, Any],
        progress: Progress,
        ttl_s: float,
    ) -> Job | None:
        now = self._clock()
        return await self._write_as_holder(
            "complete",
            job_id,
            worker_id,
            progress,
            now=now,
            result=dump_text_json(result),
            expires_at=now + ttl_s,
        )

    async def fail(
        self,
        job_id: str,
        worker_id: str,
        error: dict[str, Any],
        progress: Progress,
        ttl_s: float,
    ) -> Job | None:
        now = self._clock()
        return await self._write_as_holder(
            "fail",
            job_id,
            worker_id,
            progress,
            now=now,
            error=dump_text_json(error),
            expires_at=now + ttl_s,
        )

    async def retry_later(
        self,
        job_id: str,
        worker_id: str,
        delay_s: float,
        error: dict[str, Any],
        progress: Progress,
    ) -> Job | None:
        now = self._clock()
        return await self._write_as_holder(
            "retry_later",
            job_id,
            worker_id,
            progress,
            now=now,
            run_after=now + delay_s,
            error=dump_text_json(error),
        )

    async def release(self, job_id: str, worker_id: str, progress: Progress) -> Job | None:
        return await self._write_as_holder("release", job_id, worker_id, progress)
