"""The job engine: one dispatcher, bounded concurrency, named tasks, leases, sweeps.

It knows the :class:`~longdl.store.Store` and :class:`~longdl.storage.Storage`
interfaces, not SQL or S3. Each process is a *worker* with an id made at start-up; the
jobs it claims are leased in that name, and its heartbeat (with the progress flush)
renews the leases. Every job runs as a task named ``longdl job {id}``; its final status
write runs as a task of its own, retried until it lands, so neither a shutdown nor a
failing database can lose it.

Background loops:

- the dispatcher claims queued jobs when slots are free;
- the heartbeat writes progress (at most every PROGRESS_FLUSH_MS) and renews leases
  (at least every LEASE_S / 3), and learns which jobs it lost (canceled elsewhere, or
  re-queued by another process after its lease ran out);
- maintenance re-queues stalled jobs of dead workers and lets the store tidy up (every
  LEASE_S / 3, and at start-up), and every SWEEP_INTERVAL_S expires finished jobs past
  their TTL in batches until none is due, purges old rows, empties the trash and (every
  ORPHAN_SCAN_EVERY sweeps, and at start-up) removes partial uploads nobody is writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import socket
import time
import uuid
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar

from longdl import exceptions, ids, retry
from longdl.callbacks import call_each
from longdl.config import Settings
from longdl.models import Job, JobStatus, Priority, Progress
from longdl.storage import (
    ObjectInfo,
    Partial,
    SignedUrl,
    Storage,
    ZipMember,
    ZipProgress,
    ZipWritten,
)
from longdl.store import Claim, Inserted, Limits, NewJob, Store, WorkerInfo
from longdl.store import base as store_base
from longdl.timeouts import Timeouts

log = logging.getLogger("longdl.engine")

#: Shortest gap between two change notifications of one job's progress.
NOTIFY_INTERVAL_S = 0.05
#: The dispatcher looks for claimable jobs at least this often, so jobs another process
#: queued (or a request that was cut off before it could wake us) start without delay.
IDLE_POLL_S = 1.0
#: Jobs claimed in one statement at most.
CLAIM_BATCH = 32
#: Rows one maintenance step handles at most (it loops until nothing is due).
SWEEP_BATCH = 500
#: Partial uploads are looked for at start-up and every this many sweeps.
ORPHAN_SCAN_EVERY = 10
#: First wait before trying a final status write, or a running job's write while the
#: database is away, again; it doubles with each failure up to MAX_RETRY_DELAY_S.
FIRST_RETRY_DELAY_S = 0.05
#: Longest wait between two tries of a final status write, a running job's write while
#: the database is away, or any maintenance step.
MAX_RETRY_DELAY_S = 5.0
#: Finished jobs kept in memory at most (each until its TTL runs out).
FINISHED_CACHE_SIZE = 10_000
#: What a job given back at a graceful shutdown says.
RELEASED = "Re-queued: the service restarted"
#: A sweep deleting trash items has them for this long before another may try.
TRASH_LEASE_S = 60.0

T = TypeVar("T")

StopReason = Literal["cancel", "shutdown", "lost"]


@dataclass(frozen=True)
class Artifact:
    """What a handler produced: an object in storage the client downloads."""

    key: str
    filename: str
    size_bytes: int
    #: False when the artifact is a source object (passthrough): never delete it.
    owned: bool = True
    sha256: str | None = None
    content_type: str = "application/octet-stream"
    #: Handler-specific facts shown in the job's result (e.g. files, missing).
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every value, on every job's completion.
        return {
            "key": self.key,
            "filename": self.filename,
            "size_bytes": self.size_bytes,
            "owned": self.owned,
            "sha256": self.sha256,
            "content_type": self.content_type,
            "details": dict(self.details),
        }


Handler = Callable[["JobContext"], Awaitable[Artifact]]
Listener = Callable[[Job], None]


def new_worker_id() -> str:
    """A fresh worker id: unique per process start, readable in logs, safe in a file
    name (letters, digits and dashes)."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32].strip("-") or "host"
    return f"w-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class JobContext:
    """What a handler gets: the job, storage, settings and progress reporting.

    Cancellation arrives as ``asyncio.CancelledError``; clean up in ``finally``, and ask
    :attr:`stop_reason` whether the job is gone for good or will run again. It can also
    arrive from :meth:`set_status` or a storage write, when the job turns out to have
    been canceled or taken over since the last heartbeat; while the database is away
    those two wait until it is back.
    """

    def __init__(self, engine: Engine, running: _Running) -> None:
        self._engine = engine
        self._running = running
        #: Storage; every key written through it is noted against the job first, so what
        #: does not become the job's result is deleted when the job ends.
        self.storage: Storage = _JobStorage(engine, running)
        self.settings = engine.settings

    @property
    def job(self) -> Job:
        return self._running.job

    @property
    def job_id(self) -> str:
        return self._running.job.id

    @property
    def payload(self) -> dict[str, Any]:
        return self._running.job.payload

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the job is being stopped, for a handler's ``except CancelledError``:
        ``"cancel"`` (the caller canceled it: clean up for good), ``"shutdown"`` (it will
        be re-queued and run again: keep what a later attempt can resume), ``"lost"``
        (another process took it over: leave its objects alone), or None (the time
        limit, or not stopping)."""
        return self._running.stop_reason

    def report(
        self,
        *,
        percent: float | None = None,
        message: str | None = None,
        files_done: int | None = None,
        files_total: int | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
    ) -> None:
        """Update progress in memory; ``percent`` only ever moves forward."""
        progress = self._running.job.progress
        if percent is not None:
            progress.percent = round(max(progress.percent, min(100.0, percent)), 1)
        if message is not None:
            progress.message = message
        if files_done is not None:
            progress.files_done = files_done
        if files_total is not None:
            progress.files_total = files_total
        if bytes_done is not None:
            progress.bytes_done = bytes_done
        if bytes_total is not None:
            progress.bytes_total = bytes_total
        self._running.version += 1
        self._running.dirty = True
        self._engine._progress_changed(self._running, force=message is not None)

    async def set_status(self, status: Literal[JobStatus.PROCESSING_ARTIFACTS]) -> None:
        """Enter the artifact phase (persisted at once)."""
        job = self._running.job
        engine = self._engine
        stored = await engine.write_while_running(
            job.id, lambda: engine.store.set_status(job.id, engine.worker_id, status, job.progress)
        )
        if stored is None:
            await engine.stop_not_held(self._running)
        job.status = status
        job.updated_at = stored.updated_at
        self._running.version += 1
        self._running.dirty = False
        self._engine.hub.notify(job)


class _JobStorage(Storage):
    """The engine's storage as one job sees it: writes are noted against the job first."""

    def __init__(self, engine: Engine, running: _Running) -> None:
        self._engine = engine
        self._running = running
        self._inner = engine.storage
        self.name = self._inner.name

    async def check(self) -> None:
        await self._inner.check()

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._inner.head(key)

    def read(self, key: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        return self._inner.read(key, chunk_bytes)

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        await self._note(key)
        return await self._inner.write(key, chunks, content_type)

    async def write_zip(
        self,
        key: str,
        members: Sequence[ZipMember],
        on_progress: ZipProgress | None = None,
    ) -> ZipWritten:
        await self._note(key)
        return await self._inner.write_zip(key, members, on_progress)

    async def _note(self, key: str) -> None:
        """Record ``key`` as the job's output before anything is written to it."""
        engine, job_id = self._engine, self._running.job.id
        held = await engine.write_while_running(
            job_id, lambda: engine.store.add_output(job_id, engine.worker_id, key)
        )
        if not held:
            # Canceled or taken over since the last heartbeat: the key would be noted
            # nowhere, so nothing would ever delete it. Stop before writing it.
            await engine.stop_not_held(self._running)
        if key not in self._running.outputs:
            self._running.outputs.append(key)

    async def delete(self, key: str) -> None:
        await self._inner.delete(key)

    async def signed_url(self, key: str, expires_in_s: int, filename: str) -> SignedUrl:
        return await self._inner.signed_url(key, expires_in_s, filename)

    def __getattr__(self, name: str) -> object:
        # Backend-specific helpers stay reachable.
        return getattr(self._inner, name)


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[None] | None = None
    #: Moves with every change of ``job`` (renderings are kept per version).
    version: int = 0
    dirty: bool = False
    last_notify: float = 0.0
    stop_reason: StopReason | None = None
    finish_task: asyncio.Task[Job | None] | None = None
    #: Its slot is free again: its handler returned, only its final write is left.
    slot_freed: bool = False
    #: A throttled progress change waiting to be announced (trailing edge).
    pending_notify: asyncio.TimerHandle | None = None
    #: Keys this run noted as the job's outputs before writing them.
    outputs: list[str] = field(default_factory=list)

    def cancel_pending_notify(self) -> None:
        if self.pending_notify is not None:
            self.pending_notify.cancel()
            self.pending_notify = None


class _SlotOffer:
    """A slot held for the claim an insert is offered, until the insert settles: its
    commit starts the job in that slot; an insert that claimed nothing, failed or was
    given up on frees it. Held, not only seen free: inserts running at once each see the
    slots taken before them, so a burst claims no more jobs than there are slots, and
    the rest are counted against MAX_QUEUED."""

    __slots__ = ("_engine", "held")

    def __init__(self, engine: Engine) -> None:
        engine._slots._value -= 1  # acquire without waiting: the caller saw it free
        self._engine = engine
        self.held = True

    def withdraw(self) -> None:
        """Free the slot, unless the job it was held for has it."""
        if self.held:
            self.held = False
            self._engine._slots.release()

    def claimed(self, job: Job) -> None:
        """The store: the insert claimed ``job`` and committed."""
        held, self.held = self.held, False
        self._engine._claimed_at_insert(job, held)


class Watch:
    """One waiter's interest in a job's next change (a long-poll, an event stream).

    Taken before the waiter reads the job, so a change in between counts; once the job
    changed it stays changed, whatever the waiter was doing at the time (writing a
    heartbeat, say). A waiter waits on it as often as it likes and closes it when done.
    Cheaper than ``asyncio.timeout`` around ``Event.wait``: a held waiter keeps one
    future and a heap entry, not a timer, a timeout object and a coroutine frame.
    """

    __slots__ = ("_future", "_hub", "changed", "job_id")

    def __init__(self, hub: ChangeHub, job_id: str) -> None:
        self._hub = hub
        self.job_id = job_id
        #: The job changed (or the service is draining) since the watch was taken.
        self.changed = False
        self._future: asyncio.Future[bool] | None = None

    def wait(self, timeout_s: float) -> asyncio.Future[bool]:
        """A future that becomes True when the job changes (at once if it already did),
        False after ``timeout_s`` (to within a few tenths of a second); await it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if self.changed or timeout_s <= 0:
            future.set_result(self.changed)
        else:
            self._future = future
            self._hub._timeouts.add(future, timeout_s, loop)
        return future

    def _set(self) -> None:
        self.changed = True
        future = self._end_wait()
        if future is not None and not future.done():
            future.set_result(True)

    def renew(self) -> None:
        """Watch for the change after the one this watch saw: call it before reading the
        job again, so a change in between is not missed."""
        self.close()
        self.changed = False
        self._hub._add(self)

    def close(self) -> None:
        """Stop watching (a waiter that is done: answered, gone or cancelled)."""
        self._hub._forget(self)
        future = self._end_wait()
        if future is not None and not future.done():
            future.cancel()

    def _end_wait(self) -> asyncio.Future[bool] | None:
        """The pending wait's future, no longer waited on nor timed; None if none."""
        future, self._future = self._future, None
        if future is not None:
            self._hub._timeouts.discard(future)
        return future


class ChangeHub:
    """Per-job change notification for long-polls and event streams, plus listeners.

    Two ways to wait: :meth:`event` (an ``asyncio.Event`` per job, for the rare waiter)
    and :meth:`watch` (for the many held requests): watches time out on one timer shared
    by all of them (:class:`longdl.timeouts.Timeouts`).
    """

    def __init__(self) -> None:
        self._events: weakref.WeakValueDictionary[str, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )
        self._watches: dict[str, set[Watch]] = {}
        #: The waits of watches, answered False when their time passes.
        self._timeouts: Timeouts[asyncio.Future[bool]] = Timeouts(_timed_out)
        self._listeners: list[Listener] = []

    def event(self, job_id: str) -> asyncio.Event:
        """An event set by the job's next change; take it before reading the job."""
        event = self._events.get(job_id)
        if event is None:
            event = asyncio.Event()
            self._events[job_id] = event
        return event

    def watch(self, job_id: str) -> Watch:
        """A :class:`Watch` of the job's next change; take it before reading the job and
        close it when done."""
        watch = Watch(self, job_id)
        self._add(watch)
        return watch

    def _add(self, watch: Watch) -> None:
        watches = self._watches.get(watch.job_id)
        if watches is None:
            watches = self._watches[watch.job_id] = set()
        watches.add(watch)

    def wake_all(self) -> None:
        """Wake everyone waiting for a change (the service is shutting down)."""
        events = list(self._events.values())
        self._events.clear()
        for event in events:
            event.set()
        watches, self._watches = self._watches, {}
        for job_watches in watches.values():
            for watch in job_watches:
                watch._set()

    def wake(self, job_id: str) -> None:
        """Wake whoever waits for this job's next change (it changed elsewhere); they
        read it again."""
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()
        self._wake_watches(job_id)

    @property
    def watching(self) -> int:
        """Watches waiting for a change: the long-polls and event streams held here."""
        return sum(len(watches) for watches in self._watches.values())

    def is_watched(self, job_id: str) -> bool:
        """Whether someone is waiting for this job's next change right now."""
        return job_id in self._events or job_id in self._watches

    def notify(self, job: Job) -> None:
        # Most changes have no waiter: skip the weak dict's pop, which raises inside.
        event = self._events.pop(job.id, None) if self._events else None
        if event is not None:
            event.set()
        self._wake_watches(job.id)
        call_each(self._listeners, job, log=log, what="change listener")

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with a snapshot on every change; returns the remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _wake_watches(self, job_id: str) -> None:
        watches = self._watches.pop(job_id, None)
        if watches is not None:
            for watch in watches:
                watch._set()

    def _forget(self, watch: Watch) -> None:
        watches = self._watches.get(watch.job_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.job_id]


def _timed_out(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


class Engine:
    """Claims queued jobs and runs them with bounded concurrency.

    Args:
        store: durable job state (opened by the caller).
        storage: where handlers read and write objects (opened by the caller).
        handlers: job kind -> handler.
        settings: concurrency, retries, leases, time limits, TTLs.
        worker_id: this process's id in the store; a fresh one when None.
    """

    def __init__(
        self,
        store: Store,
        storage: Storage,
        handlers: Mapping[str, Handler],
        settings: Settings,
        *,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.handlers = dict(handlers)
        self.worker_id = worker_id or new_worker_id()
        self.hub = ChangeHub()
        self._running: dict[str, _Running] = {}
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._stop_deadline = float("inf")
        self._services: list[asyncio.Task[None]] = []
        self._finishing: set[asyncio.Task[Job | None]] = set()
        self._finished: dict[str, Job] = {}
        self._webhooks_due_listeners: list[Callable[[], None]] = []
        self._sweeps = 0
        self._last_flush = 0.0
        self.started_at = time.time()

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def heartbeat_interval_s(self) -> float:
        """How often leases are renewed (and progress flushed when due)."""
        return min(self.settings.progress_flush_ms / 1000, self.settings.lease_s / 3)

    async def start(self) -> None:
        """Register this worker, take back jobs of dead workers, then start the loops."""
        self.storage.writer_id = self.worker_id
        await self.store.register_worker(
            WorkerInfo(self.worker_id, socket.gethostname(), os.getpid())
        )
        log.info("worker.started worker_id=%s", self.worker_id)
        self.store.add_change_listener(self._changed_elsewhere, self._missed_changes)
        await self.rescue()
        with contextlib.suppress(Exception):
            await self.remove_orphans()
        self._stopping = False
        self._services = [
            asyncio.create_task(self._heartbeat_loop(), name="longdl heartbeat"),
            asyncio.create_task(self._maintenance_loop(), name="longdl maintenance"),
        ]
        if self.settings.worker_concurrency:
            self._services.append(asyncio.create_task(self._dispatch(), name="longdl dispatcher"))

    def drain(self) -> None:
        """Begin shutting down: refuse new jobs (503), stop claiming queued ones, and wake
        every long-poll and synchronous wait so it answers now instead of holding the
        shutdown up. Running jobs go on until :meth:`stop`."""
        self._stopping = True
        self._wakeup.set()
        self.hub.wake_all()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming, give running jobs ``grace_s`` to finish, give the rest back to
        the queue (no attempt used, no stall), and unregister this worker."""
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self._stopping = True
        self._stop_deadline = time.monotonic() + grace_s + 2.0
        self._wakeup.set()
        for task in self._services:
            task.cancel()
        await asyncio.gather(*self._services, return_exceptions=True)
        self._services = []
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for running in list(self._running.values()):
            if running.task is not None and not running.task.done():
                running.stop_reason = "shutdown"
                running.task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._finishing, return_exceptions=True)
        if self._running:
            # Final writes that could not land: the leases run out and another process
            # (or the next start) takes these jobs back.
            log.warning("worker.stopped_with_unwritten_jobs count=%d", len(self._running))
            return
        try:
            # A claim that committed while the dispatcher was being cancelled holds jobs
            # that never started here: give them back too.
            for job_id in await self.store.release_all(self.worker_id, RELEASED):
                log.info("job.requeued job_id=%s reason=shutdown", job_id)
            await self.store.unregister_worker(self.worker_id)
        except Exception as exc:
            log.warning("worker.unregister_failed error=%r", exc)
        log.info("worker.stopped worker_id=%s", self.worker_id)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def running_count(self) -> int:
        return len(self._running)

    # --- API for the web layer ---------------------------------------------------------

    async def submit(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        owner: str = "",
        client: str = "",
        priority: Priority = Priority.NORMAL,
        user_id: str | None = None,
        client_request_id: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str = "",
        progress: Progress | None = None,
    ) -> Inserted:
        """Queue a job (committed before this returns) or replay an idempotent one.

        Args:
            owner: whose job it is (who may see it): the API key's name, or "".
            client: who sent it, for per-caller limits; ``owner`` when empty.

        Raises:
            exceptions.IdempotencyMismatch: the key was used with another request.
            exceptions.Overloaded: the queue is full.
            exceptions.TooManyActiveJobs: the caller has too many unfinished jobs.
            exceptions.StoreUnavailable: the database cannot take the job now.
        """
        if kind not in self.handlers:
            raise ValueError(f"no handler for job kind {kind!r}")
        if self._stopping:
            raise exceptions.Overloaded("The service is shutting down", retry_after_s=5)
        new = NewJob(
            id=ids.uuid4(),
            kind=kind,
            payload=payload,
            max_attempts=self.settings.max_attempts,
            priority=priority,
            owner=owner,
            client=client or owner,
            user_id=user_id,
            client_request_id=client_request_id,
            callback_url=callback_url,
            expires_at=time.time() + self.settings.job_ttl_s,
            progress=progress,
        )
        # A free slot and nothing waiting: the job is claimed in its insert and starts as
        # soon as that commits, without a second transaction or a trip through the queue.
        offer = claim = None
        if self.settings.worker_concurrency and not self._slots.locked():
            offer = _SlotOffer(self)
            claim = Claim(self.worker_id, self.settings.lease_s, offer.claimed)
        claimed = False
        try:
            inserted = await self.store.insert_job(
                new,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                limits=Limits(self.settings.max_queued, self.settings.max_active_per_user),
                claim=claim,
            )
            claimed = not inserted.replayed and inserted.job.status is not JobStatus.QUEUED
        finally:
            if offer is not None and not claimed:
                # Queued behind others, replayed, refused, failed, or given up on with its
                # outcome unknown: should that one still commit claimed,
                # _claimed_at_insert finds a slot or gives it back.
                offer.withdraw()
        if inserted.replayed:
            if inserted.request_hash != request_hash:
                raise exceptions.IdempotencyMismatch(
                    "This idempotency key was already used with a different request"
                )
            return inserted
        log.info("job.queued job_id=%s kind=%s", inserted.job.id, kind)
        if inserted.job.status is JobStatus.QUEUED:
            self.hub.notify(inserted.job)
            self._wakeup.set()
        return inserted

    def _claimed_at_insert(self, job: Job, held: bool) -> None:
        """A job claimed by its own insert is committed: start it in the slot ``held``
        for it (called by the store, whatever happened to the request meanwhile)."""
        if self._stopping:
            if held:
                self._slots.release()
            return  # stop() gives it back with every job this worker holds
        if not held:
            # Its request gave up on the insert and freed the slot.
            if self._slots.locked():
                # Taken meanwhile: back to the queue with it.
                task = asyncio.create_task(self._give_back(job), name=f"longdl give back {job.id}")
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)
                return
            self._slots._value -= 1  # acquire without waiting: it is free (checked above)
        self._start(job)

    async def _give_back(self, job: Job) -> Job | None:
        progress = store_base.requeued_progress(job, "Queued")
        try:
            return await self.store.release(job.id, self.worker_id, progress)
        finally:
            self._wakeup.set()

    async def get(self, job_id: str) -> Job | None:
        """The job as it is now; jobs running here come from memory, finished jobs from
        memory until their TTL runs out (nothing changes them before), others from the
        store."""
        running = self._running.get(job_id)
        if running is not None:
            return dataclasses.replace(
                running.job, progress=dataclasses.replace(running.job.progress)
            )
        finished = self._finished.get(job_id)
        if finished is not None:
            if finished.expires_at is not None and time.time() < finished.expires_at:
                return finished
            del self._finished[job_id]
        job = await self.store.get_job(job_id)
        if job is not None:
            self._keep_finished(job)
        return job

    def live(self, job_id: str) -> tuple[Job, tuple[int, int]] | None:
        """A job running here as it is, not a copy, with its version; None when it does
        not run here. The job changes under the caller at its next await: read it now."""
        running = self._running.get(job_id)
        if running is None:
            return None
        return running.job, (id(running), running.version)

    def _keep_finished(self, job: Job) -> None:
        """Remember a finished job until its TTL runs out: only expiry changes it then."""
        if (
            job.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)
            and job.expires_at is not None
            and time.time() < job.expires_at
        ):
            if len(self._finished) >= FINISHED_CACHE_SIZE:
                del self._finished[next(iter(self._finished))]
            self._finished[job.id] = job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (running here, or in another process, which
        stops it at its next heartbeat).

        Raises:
            exceptions.JobNotFound: no such job.
            exceptions.JobFinished: it already finished.
        """
        async with self._lock:
            running = self._running.get(job_id)
            if running is None:
                job = await self.store.cancel(job_id, self.settings.job_ttl_s, "Canceled")
                if job is None:
                    existing = await self.store.get_job(job_id)
                    if existing is None:
                        raise exceptions.JobNotFound(job_id)
                    raise exceptions.JobFinished(existing.status.value)
                log.info("job.canceled job_id=%s while=%s", job_id, "queued")
                self.hub.notify(job)
                return job
            if running.finish_task is None and running.task is not None:
                running.stop_reason = "cancel"
                running.task.cancel()
            task = running.task
        if task is not None:
            # Wait for the job's own final write, without letting our caller's
            # cancellation cancel the job task a second time.
            await asyncio.wait({task})
        job = await self.get(job_id)
        if job is None:
            raise exceptions.JobNotFound(job_id)
        if job.status is not JobStatus.CANCELED:
            raise exceptions.JobFinished(job.status.value)
        return job

    async def wait_finished(self, job_id: str, timeout_s: float) -> Job | None:
        """Wait up to ``timeout_s`` for the job to finish; return it as it is then."""
        deadline = time.monotonic() + timeout_s
        while True:
            event = self.hub.event(job_id)
            job = await self.get(job_id)
            remaining = deadline - time.monotonic()
            if job is None or job.status.finished or remaining <= 0 or self._stopping:
                return job
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await event.wait()

    def _changed_elsewhere(self, job_id: str, status: str) -> None:
        """A change any process committed (store notifications): wake who waits for the
        job; new work wakes the dispatcher; a job running here that was canceled
        elsewhere stops now rather than at the next heartbeat."""
        running = self._running.get(job_id)
        if running is None:
            self.hub.wake(job_id)
            if status == JobStatus.QUEUED:
                self._wakeup.set()
            return
        if (
            status == JobStatus.CANCELED
            and running.stop_reason is None
            and running.finish_task is None
            and running.task is not None
        ):
            log.info("job.canceled_elsewhere job_id=%s", job_id)
            running.stop_reason = "cancel"
            running.task.cancel()

    def _missed_changes(self) -> None:
        """Notifications may have been lost: everyone waiting reads again."""
        self.hub.wake_all()
        self._wakeup.set()

    # --- the dispatcher ----------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._stopping:
            await self._slots.acquire()
            free = 1
            while free < CLAIM_BATCH and not self._slots.locked():
                await self._slots.acquire()
                free += 1
            try:
                claimed, next_at = await self._claim(free)
            except Exception as exc:
                claimed, next_at = 0, time.time() + 1
                log.warning("claiming jobs failed; retrying within 1 s: %r", exc)
            for _ in range(free - claimed):
                self._slots.release()
            if not claimed:
                await self._idle(next_at)

    async def _claim(self, free: int) -> tuple[int, float | None]:
        """Claim and start up to ``free`` jobs. Returns how many started and, when none
        did, when the next waiting job is due (None: nothing waits)."""
        self._wakeup.clear()  # before the read: a job queued after it ends _idle
        # A read first: a claim is a write, and most wake-ups find nothing to take.
        next_at = await self.store.next_run_after()
        if next_at is not None and next_at <= time.time():
            async with self._lock:
                if self._stopping:
                    return 0, None
                jobs = await self.store.claim(self.worker_id, self.settings.lease_s, free)
                for job in jobs:
                    self._start(job)
            if jobs:
                return len(jobs), None
            next_at = await self.store.next_run_after()  # taken by another process
        return 0, next_at

    async def _idle(self, next_at: float | None) -> None:
        """Wait until a job is due, we are woken, or IDLE_POLL_S passes, holding no slot:
        a job submitted meanwhile is claimed by its own insert."""
        timeout_s = IDLE_POLL_S if next_at is None else max(0.0, next_at - time.time())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(timeout_s, IDLE_POLL_S)):
                await self._wakeup.wait()

    def _start(self, job: Job) -> None:
        job.progress = Progress(message="Starting", files_total=job.progress.files_total)
        running = _Running(job=job)
        self._running[job.id] = running
        running.task = asyncio.create_task(self._run(running), name=f"longdl job {job.id}")
        running.task.add_done_callback(lambda _: self._job_done(running))
        log.info("job.started job_id=%s attempt=%d", job.id, job.attempts)
        self.hub.notify(job)

    def _job_done(self, running: _Running) -> None:
        running.cancel_pending_notify()
        self._forget(running)
        self._free_slot(running)

    def _free_slot(self, running: _Running) -> None:
        if not running.slot_freed:
            running.slot_freed = True
            self._slots.release()

    def _forget(self, running: _Running) -> None:
        """Stop serving this attempt from memory (a retry may already run under the id)."""
        if self._running.get(running.job.id) is running:
            del self._running[running.job.id]

    async def _run(self, running: _Running) -> None:
        job = running.job
        handler = self.handlers.get(job.kind)
        timeout = asyncio.timeout(self.settings.job_timeout_s)
        try:
            if handler is None:
                raise exceptions.JobFailed("UNKNOWN_KIND", f"No handler for {job.kind!r}")
            async with timeout:
                artifact = await handler(JobContext(self, running))
        except asyncio.CancelledError:
            if running.stop_reason is None:
                raise
            await self._finish(running, *self._stopped(running))
        except Exception as exc:
            if isinstance(exc, TimeoutError) and timeout.expired():
                exc = exceptions.JobFailed(
                    "TIMEOUT",
                    f"The job took longer than {self.settings.job_timeout_s:g} s",
                    retryable=False,
                )
            await self._finish(running, *self._errored(running, exc))
        else:
            await self._finish(running, *self._succeeded(running, artifact))

    # --- final writes ------------------------------------------------------------------

    async def _finish(
        self,
        running: _Running,
        final: Job | None,
        write: Callable[[], Awaitable[Job | None]] | None,
    ) -> None:
        """Land the attempt's final write, as a task of its own so that cancellation
        cannot cut it, retried with backoff until it lands. Until it has, readers get
        ``final`` (the outcome as it will be stored) from memory; should the process
        die first, the job's lease runs out and another process takes it back."""
        # The final status is the last word; no stale progress may follow it.
        running.cancel_pending_notify()
        if final is not None:
            running.job = final
            running.version += 1
        if write is None:
            self._forget(running)
            return
        task = asyncio.create_task(
            self._write_until_landed(running.job.id, self._or_trash_outputs(running, write)),
            name=f"longdl finish {running.job.id}",
        )
        running.finish_task = task
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        # The handler is done: the next job may start while this one's write lands.
        self._free_slot(running)
        try:
            stored = await asyncio.shield(task)
        except Exception:
            stored = None  # gave up at shutdown: the lease takes over
            self._forget(running)
            return
        # From here on readers must see the stored state, not the attempt's memory.
        self._forget(running)
        if stored is None:
            stored = await self._stored_or_none(running.job.id)
        if stored is not None:
            self._keep_finished(stored)
            self.hub.notify(stored)

    def _or_trash_outputs(
        self, running: _Running, write: Callable[[], Awaitable[Job | None]]
    ) -> Callable[[], Awaitable[Job | None]]:
        """``write``, and should it be refused (the job was canceled or taken over
        meanwhile), the run's outputs to the trash if the job has finished since: a run
        that stalled past the job's end may have written them after the job's own end
        trashed them and the trash was emptied, and they would stay forever."""
        if not running.outputs:
            return write
        job_id, outputs = running.job.id, running.outputs

        async def write_or_trash() -> Job | None:
            stored = await write()
            if stored is None and await self.store.trash_late_outputs(job_id, outputs):
                log.info("job.late_outputs_trashed job_id=%s", job_id)  # the next sweep
            return stored

        return write_or_trash

    async def _write_until_landed(
        self, job_id: str, write: Callable[[], Awaitable[Job | None]]
    ) -> Job | None:
        delay_s = FIRST_RETRY_DELAY_S
        while True:
            try:
                return await write()
            except Exception as exc:
                if self._stopping and time.monotonic() > self._stop_deadline:
                    log.error("job.final_write_abandoned job_id=%s error=%r", job_id, exc)
                    raise
                log.warning(
                    "job.final_write_failed job_id=%s retry_in_s=%.2f error=%r",
                    job_id,
                    delay_s,
                    exc,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, MAX_RETRY_DELAY_S)

    async def write_while_running(self, job_id: str, write: Callable[[], Awaitable[T]]) -> T:
        """Make a write a running job needs on its way (entering the artifact phase,
        noting an output before writing it), waiting in place while the database is away:
        PostgreSQL restarting, another process holding SQLite's write lock. Both writes
        are idempotent, so the job goes on where it was once the database is back,
        instead of throwing its work away and using an attempt. The wait counts against
        JOB_TIMEOUT_S, and a cancel or a stop ends it as it ends the job.

        A full disk is not waited out: the attempt fails with DISK_FULL and retries
        later with backoff, its slot free meanwhile.
        """
        delay_s = FIRST_RETRY_DELAY_S
        while True:
            try:
                return await write()
            except exceptions.StoreFull:
                raise
            except exceptions.StoreUnavailable as exc:
                log.warning(
                    "job.write_waiting job_id=%s retry_in_s=%.2f error=%s", job_id, delay_s, exc
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, MAX_RETRY_DELAY_S)

    async def _stored_or_none(self, job_id: str) -> Job | None:
        try:
            return await self.store.get_job(job_id)
        except Exception:
            return None

    def _succeeded(
        self, running: _Running, artifact: Artifact
    ) -> tuple[Job, Callable[[], Awaitable[Job | None]]]:
        job = running.job
        progress = dataclasses.replace(job.progress, percent=100.0, message="Ready to download")
        now = time.time()
        final = dataclasses.replace(
            job,
            status=JobStatus.COMPLETED,
            result=artifact.to_dict(),
            error=None,
            progress=progress,
            finished_at=now,
            updated_at=now,
            expires_at=now + self.settings.job_ttl_s,
        )

        async def write() -> Job | None:
            done = await self.store.complete(
                job.id, self.worker_id, artifact.to_dict(), progress, self.settings.job_ttl_s
            )
            if done is not None:
                log.info("job.completed job_id=%s attempt=%d", job.id, job.attempts)
            else:
                # Canceled or taken over meanwhile; what it wrote is in the job's outputs,
                # which the store trashes when the job ends without them.
                log.info("job.completed_too_late job_id=%s", job.id)
            return done

        return final, write

    def _errored(
        self, running: _Running, exc: Exception
    ) -> tuple[Job, Callable[[], Awaitable[Job | None]]]:
        job = running.job
        decision = retry.decide(
            job.attempts,
            job.max_attempts,
            exc,
            base_s=self.settings.retry_base_s,
            cap_s=self.settings.retry_max_s,
        )
        error = {
            "code": decision.code,
            "message": decision.message,
            "retryable": decision.retryable,
        }
        now = time.time()
        if decision.retry:
            log.warning(
                "job.retry job_id=%s attempt=%d delay_s=%.2f error=%r",
                job.id,
                job.attempts,
                decision.delay_s,
                exc,
            )
            progress = Progress(
                message=f"Retrying in {decision.delay_s:.1f} s: {decision.message}",
                files_total=job.progress.files_total,
            )
            final = dataclasses.replace(
                job,
                status=JobStatus.QUEUED,
                error=error,
                progress=progress,
                run_after=now + decision.delay_s,
                updated_at=now,
            )

            async def retry_write() -> Job | None:
                queued = await self.store.retry_later(
                    job.id, self.worker_id, decision.delay_s, error, progress
                )
                self._wakeup.set()
                return queued

            return final, retry_write
        log.warning("job.failed job_id=%s attempt=%d error=%r", job.id, job.attempts, exc)
        progress = dataclasses.replace(job.progress, message=decision.message)
        final = dataclasses.replace(
            job,
            status=JobStatus.FAILED,
            error=error,
            progress=progress,
            finished_at=now,
            updated_at=now,
            expires_at=now + self.settings.job_ttl_s,
        )

        async def fail_write() -> Job | None:
            return await self.store.fail(
                job.id, self.worker_id, error, progress, self.settings.job_ttl_s
            )

        return final, fail_write

    def _stopped(
        self, running: _Running
    ) -> tuple[Job | None, Callable[[], Awaitable[Job | None]] | None]:
        job = running.job
        now = time.time()
        if running.stop_reason == "cancel":
            log.info("job.canceled job_id=%s while=%s", job.id, job.status.value)
            progress = dataclasses.replace(job.progress, message="Canceled")
            final = dataclasses.replace(
                job,
                status=JobStatus.CANCELED,
                progress=progress,
                error={"code": "CANCELED", "message": "Canceled", "retryable": False},
                finished_at=now,
                updated_at=now,
                expires_at=now + self.settings.job_ttl_s,
            )

            async def cancel_write() -> Job | None:
                return await self.store.cancel(job.id, self.settings.job_ttl_s, "Canceled")

            return final, cancel_write
        if running.stop_reason == "lost":
            log.info("job.lost job_id=%s", job.id)
            return None, None
        log.info("job.requeued job_id=%s reason=shutdown", job.id)
        progress = store_base.requeued_progress(job, RELEASED)
        final = dataclasses.replace(
            job,
            status=JobStatus.QUEUED,
            attempts=max(0, job.attempts - 1),
            progress=progress,
            updated_at=now,
        )

        async def release_write() -> Job | None:
            return await self.store.release(job.id, self.worker_id, progress)

        return final, release_write

    # --- progress and heartbeats -------------------------------------------------------

    def _progress_changed(self, running: _Running, *, force: bool) -> None:
        """Announce progress at most every NOTIFY_INTERVAL_S; a change inside the interval
        is announced at its end, so a waiting long-poll never misses the last one."""
        if running.finish_task is not None:
            return
        due = running.last_notify + NOTIFY_INTERVAL_S
        now = time.monotonic()
        if force or now >= due:
            self._notify_progress(running)
        elif running.pending_notify is None:
            running.pending_notify = asyncio.get_running_loop().call_later(
                due - now, self._notify_progress, running
            )

    def _notify_progress(self, running: _Running) -> None:
        running.cancel_pending_notify()
        running.last_notify = time.monotonic()
        running.job.updated_at = time.time()
        running.version += 1
        self.hub.notify(running.job)

    async def heartbeat(self, *, flush: bool = True) -> None:
        """Renew this worker's leases and (``flush``) write running jobs' progress; stop
        the jobs the store says this worker no longer holds."""
        watched = {
            job_id: running
            for job_id, running in self._running.items()
            if running.finish_task is None
        }
        progress: dict[str, Progress] = {}
        if flush:
            for job_id, running in watched.items():
                if running.dirty:
                    running.dirty = False
                    progress[job_id] = dataclasses.replace(running.job.progress)
        try:
            beat = await self.store.heartbeat(self.worker_id, self.settings.lease_s, progress)
        except BaseException:
            for job_id in progress:
                if job_id in watched:
                    watched[job_id].dirty = True
            raise
        for job_id, running in watched.items():
            if job_id in beat.held or self._running.get(job_id) is not running:
                continue
            if running.finish_task is not None or running.task is None:
                continue
            running.stop_reason = await self._why_not_held(job_id)
            running.task.cancel()

    async def stop_not_held(self, running: _Running) -> NoReturn:
        """Called from a running job whose write found it no longer held (canceled or
        taken over since the last heartbeat): stop it now, as the heartbeat would."""
        running.stop_reason = await self._why_not_held(running.job.id)
        task = running.task
        if task is not None and task is not asyncio.current_task():
            # The write ran in a task the handler started (a TaskGroup's, say), which
            # may swallow its own cancellation: stop the job itself too.
            task.cancel()
        raise asyncio.CancelledError

    async def _why_not_held(self, job_id: str) -> StopReason:
        stored = await self._stored_or_none(job_id)
        reason: StopReason = (
            "cancel" if stored is not None and stored.status is JobStatus.CANCELED else "lost"
        )
        log.warning("job.not_held job_id=%s stopping=%s", job_id, reason)
        return reason

    async def _heartbeat_loop(self) -> None:
        flush_s = self.settings.progress_flush_ms / 1000
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            now = time.monotonic()
            flush = now - self._last_flush >= flush_s
            try:
                await self.heartbeat(flush=flush)
            except Exception as exc:
                log.warning("heartbeat failed: %r", exc)
                continue
            if flush:
                self._last_flush = now

    # --- maintenance -------------------------------------------------------------------

    async def rescue(self) -> int:
        """Re-queue (or fail, at MAX_STALLS) jobs whose worker died or stopped renewing
        their leases; return how many."""
        total = 0
        while True:
            rescued = await self.store.rescue_stalled(
                max_stalls=self.settings.max_stalls,
                ttl_s=self.settings.job_ttl_s,
                exclude_worker=self.worker_id,
            )
            for job in rescued.requeued:
                log.warning("job.stalled job_id=%s stalls=%d requeued", job.id, job.stalls)
                self.hub.notify(job)
            for job in rescued.lost:
                log.error("job.worker_lost job_id=%s stalls=%d", job.id, job.stalls)
                self.hub.notify(job)
            count = len(rescued.requeued) + len(rescued.lost)
            total += count
            if rescued.requeued:
                self._wakeup.set()
            if rescued.webhooks_due:
                log.warning("webhook.deliveries_released count=%d", rescued.webhooks_due)
                call_each(self._webhooks_due_listeners, log=log, what="webhooks-due listener")
            if count < SWEEP_BATCH:
                return total

    def on_webhooks_due(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` when a rescue makes webhook deliveries due (a dead worker
        had them in flight); returns the function that removes it."""
        self._webhooks_due_listeners.append(listener)
        return lambda: self._webhooks_due_listeners.remove(listener)

    async def sweep(self) -> int:
        """Expire finished jobs past their TTL (row first, then the artifact), in batches
        until none is due; purge old rows; empty the trash. Returns how many expired."""
        count = 0
        while True:
            expired = await self.store.expire_due(SWEEP_BATCH)
            for job in expired:
                self._finished.pop(job.id, None)
                log.info("job.expired job_id=%s", job.id)
                self.hub.notify(job)
            count += len(expired)
            if len(expired) < SWEEP_BATCH:
                break
        while await self.store.purge(self.settings.job_retention_s, SWEEP_BATCH) >= SWEEP_BATCH:
            pass
        await self.empty_trash()
        return count

    async def empty_trash(self) -> int:
        """Delete the objects in the trash that are due; return how many went."""
        deleted = 0
        while True:
            items = await self.store.claim_trash(SWEEP_BATCH, TRASH_LEASE_S)
            if not items:
                return deleted
            failed = set(await self.storage.delete_many([item.key for item in items]))
            done = [item.key for item in items if item.key not in failed]
            if done:
                await self.store.trash_done(done)
                deleted += len(done)
            if failed:
                attempts = max(item.attempts for item in items if item.key in failed)
                await self.store.trash_retry(sorted(failed), min(3600.0, 30.0 * 2**attempts))
                log.warning("trash.delete_failed count=%d", len(failed))
            if len(items) < SWEEP_BATCH:
                return deleted

    async def remove_orphans(self) -> int:
        """Discard partial uploads no live worker is writing; return how many.

        A partial that names its writer (local storage) is an orphan when that worker is
        not alive; one that does not (an S3 multipart upload) when it is older than any
        attempt may run (JOB_TIMEOUT_S plus LEASE_S).
        """
        partials = await self.storage.list_partials()
        if not partials:
            return 0
        live = await self.store.live_workers() | {self.worker_id}
        max_age_s = self.settings.job_timeout_s + self.settings.lease_s
        now = time.time()
        removed = 0
        for partial in partials:
            if _is_orphan(partial, live, now, max_age_s):
                await self.storage.discard_partial(partial)
                log.info("orphan.removed key=%s writer=%s", partial.key, partial.writer)
                removed += 1
        return removed

    async def _maintenance_loop(self) -> None:
        rescue_every_s = self.settings.lease_s / 3
        next_sweep = time.monotonic() + self.settings.sweep_interval_s
        while True:
            await asyncio.sleep(min(rescue_every_s, self.settings.sweep_interval_s))
            try:
                await self.rescue()
                await self.store.compact()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.settings.sweep_interval_s
                    await self.sweep()
                    self._sweeps += 1
                    if self._sweeps % ORPHAN_SCAN_EVERY == 0:
                        await self.remove_orphans()
            except (exceptions.StoreUnavailable, exceptions.StorageUnavailable) as exc:
                # The database or S3 is away (restarting, say): a line each time, not a
                # traceback.
                log.warning("maintenance failed: %r; trying again next time", exc)
            except Exception:
                log.exception("maintenance failed; trying again next time")


def _is_orphan(partial: Partial, live: set[str], now: float, max_age_s: float) -> bool:
    if partial.writer is not None:
        return partial.writer not in live
    return now - partial.started_at > max_age_s
