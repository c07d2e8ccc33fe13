"""The job engine: one dispatcher, bounded concurrency, named tasks, retries, TTL sweeps.

It knows the :class:`~longdl.store.Store` and :class:`~longdl.storage.Storage`
interfaces, not SQL or S3. Every job runs as a task named ``longdl job {id}``; its
final status write is shielded so a shutdown cannot lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from longdl import exceptions, retry
from longdl.config import Settings
from longdl.models import Job, JobStatus, Priority, Progress
from longdl.storage import Storage
from longdl.store import Inserted, Limits, NewJob, Store

log = logging.getLogger("longdl.engine")

#: Shortest gap between two change notifications of one job's progress.
NOTIFY_INTERVAL_S = 0.05


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
        return dataclasses.asdict(self)


Handler = Callable[["JobContext"], Awaitable[Artifact]]
Listener = Callable[[Job], None]


class JobContext:
    """What a handler gets: the job, storage, settings and progress reporting.

    Cancellation arrives as ``asyncio.CancelledError``; clean up in ``finally``.
    """

    def __init__(self, engine: Engine, running: _Running) -> None:
        self._engine = engine
        self._running = running
        self.storage = engine.storage
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
        self._running.dirty = True
        self._engine._progress_changed(self._running, force=message is not None)

    async def set_status(self, status: Literal[JobStatus.PROCESSING_ARTIFACTS]) -> None:
        """Enter the artifact phase (persisted at once)."""
        job = self._running.job
        job.status = status
        job.updated_at = time.time()
        self._running.dirty = False
        await self._engine.store.save_progress(job.id, job.progress, status)
        self._engine.hub.notify(job)


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[None] | None = None
    dirty: bool = False
    last_notify: float = 0.0
    stop_reason: Literal["cancel", "shutdown"] | None = None
    finish_task: asyncio.Task[Job | None] | None = None
    #: A throttled progress change waiting to be announced (trailing edge).
    pending_notify: asyncio.TimerHandle | None = None

    def cancel_pending_notify(self) -> None:
        if self.pending_notify is not None:
            self.pending_notify.cancel()
            self.pending_notify = None


class ChangeHub:
    """Per-job change notification for long-polls and event streams, plus listeners."""

    def __init__(self) -> None:
        self._events: weakref.WeakValueDictionary[str, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )
        self._listeners: list[Listener] = []

    def event(self, job_id: str) -> asyncio.Event:
        """An event set by the job's next change; take it before reading the job."""
        event = self._events.get(job_id)
        if event is None:
            event = asyncio.Event()
            self._events[job_id] = event
        return event

    def wake_all(self) -> None:
        """Wake everyone waiting for a change (the service is shutting down)."""
        events = list(self._events.values())
        self._events.clear()
        for event in events:
            event.set()

    def is_watched(self, job_id: str) -> bool:
        """Whether someone is waiting for this job's next change right now."""
        return job_id in self._events

    def notify(self, job: Job) -> None:
        event = self._events.pop(job.id, None)
        if event is not None:
            event.set()
        for listener in list(self._listeners):
            try:
                listener(job)
            except Exception:
                log.exception("change listener failed")

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with a snapshot on every change; returns the remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)


class Engine:
    """Claims queued jobs and runs them with bounded concurrency.

    Args:
        store: durable job state (opened by the caller).
        storage: where handlers read and write objects (opened by the caller).
        handlers: job kind -> handler.
        settings: concurrency, retries, time limits, TTLs.
    """

    def __init__(
        self,
        store: Store,
        storage: Storage,
        handlers: Mapping[str, Handler],
        settings: Settings,
    ) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.handlers = dict(handlers)
        self.hub = ChangeHub()
        self._running: dict[str, _Running] = {}
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._services: list[asyncio.Task[None]] = []
        self._finishing: set[asyncio.Task[Job | None]] = set()
        self.started_at = time.time()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Re-queue what a dead process left running, then start the background loops."""
        recovered = await self.store.recover_interrupted("Re-queued after a restart")
        for job_id in recovered:
            log.info("job.recovered job_id=%s", job_id)
        self._stopping = False
        self._services = [
            asyncio.create_task(self._dispatch(), name="longdl dispatcher"),
            asyncio.create_task(self._flush_loop(), name="longdl progress flusher"),
            asyncio.create_task(self._sweep_loop(), name="longdl ttl sweeper"),
        ]

    def drain(self) -> None:
        """Begin shutting down: refuse new jobs (503), stop claiming queued ones, and wake
        every long-poll and synchronous wait so it answers now instead of holding the
        shutdown up. Running jobs go on until :meth:`stop`."""
        self._stopping = True
        self._wakeup.set()
        self.hub.wake_all()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming, give running jobs ``grace_s`` to finish, re-queue the rest."""
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self._stopping = True
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
        await self._flush()

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
        """
        if kind not in self.handlers:
            raise ValueError(f"no handler for job kind {kind!r}")
        if self._stopping:
            raise exceptions.Overloaded("The service is shutting down", retry_after_s=5)
        if idempotency_key is not None:
            existing = await self.store.find_idempotent(owner, idempotency_key)
            if existing is not None:
                return self._replay(existing, request_hash)
        new = NewJob(
            id=str(uuid.uuid4()),
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
        inserted = await self.store.insert_job(
            new,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            limits=Limits(self.settings.max_queued, self.settings.max_active_per_user),
        )
        if inserted.replayed:
            return self._replay(inserted, request_hash)
        log.info("job.queued job_id=%s kind=%s", inserted.job.id, kind)
        self.hub.notify(inserted.job)
        self._wakeup.set()
        return inserted

    @staticmethod
    def _replay(inserted: Inserted, request_hash: str) -> Inserted:
        if inserted.job.extra.get("request_hash") != request_hash:
            raise exceptions.IdempotencyMismatch(
                "This idempotency key was already used with a different request"
            )
        return inserted

    async def get(self, job_id: str) -> Job | None:
        """The job as it is now; running jobs come from memory, not a query."""
        running = self._running.get(job_id)
        if running is not None:
            return dataclasses.replace(
                running.job, progress=dataclasses.replace(running.job.progress)
            )
        return await self.store.get_job(job_id)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job.

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
                log.info("job.canceled job_id=%s while=queued", job_id)
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
        job = await self.store.get_job(job_id)
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

    # --- the dispatcher ----------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._stopping:
            await self._slots.acquire()
            try:
                claimed = await self._claim_one()
            except Exception:
                self._slots.release()
                log.exception("claiming a job failed; retrying in 1 s")
                await asyncio.sleep(1)
                continue
            if not claimed:
                self._slots.release()

    async def _claim_one(self) -> bool:
        """Claim and start one job, waiting until one is due; False if woken empty."""
        self._wakeup.clear()
        async with self._lock:
            if self._stopping:
                return False
            job = await self.store.claim_next()
            if job is not None:
                self._start(job)
                return True
        next_at = await self.store.next_run_after()
        timeout_s = None if next_at is None else max(0.0, next_at - time.time())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wakeup.wait()
        return False

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
            await self._finish(running, self._finish_stopped(running))
        except Exception as exc:
            if isinstance(exc, TimeoutError) and timeout.expired():
                exc = exceptions.JobFailed(
                    "TIMEOUT",
                    f"The job took longer than {self.settings.job_timeout_s:g} s",
                    retryable=False,
                )
            await self._finish(running, self._finish_error(running, exc))
        else:
            await self._finish(running, self._finish_ok(running, artifact))

    async def _finish(self, running: _Running, write: Awaitable[Job | None]) -> None:
        """Run the final status write as its own task so cancellation cannot cut it."""

        async def final() -> Job | None:
            return await write

        task = asyncio.create_task(final(), name=f"longdl finish {running.job.id}")
        running.finish_task = task
        # The final status is the last word; no stale progress may follow it.
        running.cancel_pending_notify()
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        job = await asyncio.shield(task)
        # From here on readers must see the stored final state, not the attempt's memory.
        self._forget(running)
        if job is not None:
            self.hub.notify(job)

    async def _finish_ok(self, running: _Running, artifact: Artifact) -> Job | None:
        job = running.job
        progress = dataclasses.replace(job.progress, percent=100.0, message="Ready to download")
        done = await self.store.complete(
            job.id, artifact.to_dict(), progress, self.settings.job_ttl_s
        )
        if done is None and artifact.owned:
            # Someone else finished the job first (it cannot happen within one process,
            # but a stray artifact must not outlive the job).
            await self.storage.delete(artifact.key)
        log.info("job.completed job_id=%s attempt=%d", job.id, job.attempts)
        return done

    async def _finish_error(self, running: _Running, exc: Exception) -> Job | None:
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
            queued = await self.store.retry_later(job.id, decision.delay_s, error, progress)
            self._wakeup.set()
            return queued
        log.warning("job.failed job_id=%s attempt=%d error=%r", job.id, job.attempts, exc)
        progress = dataclasses.replace(job.progress, message=decision.message)
        return await self.store.fail(job.id, error, progress, self.settings.job_ttl_s)

    async def _finish_stopped(self, running: _Running) -> Job | None:
        job = running.job
        if running.stop_reason == "cancel":
            log.info("job.canceled job_id=%s while=%s", job.id, job.status.value)
            job.progress.message = "Canceled"
            return await self.store.cancel(job.id, self.settings.job_ttl_s, "Canceled")
        log.info("job.requeued job_id=%s reason=shutdown", job.id)
        return await self.store.requeue(job.id, "Re-queued: the service restarted")

    # --- progress ----------------------------------------------------------------------

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
        self.hub.notify(running.job)

    async def _flush(self) -> None:
        for running in list(self._running.values()):
            if running.dirty and running.finish_task is None:
                running.dirty = False
                await self.store.save_progress(running.job.id, running.job.progress)

    async def _flush_loop(self) -> None:
        interval_s = self.settings.progress_flush_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._flush()
            except Exception:
                log.exception("flushing progress failed")

    # --- TTL ---------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Expire finished jobs past their TTL, deleting artifacts; return how many."""
        count = 0
        for job in await self.store.due_for_expiry():
            artifact = job.result or {}
            if artifact.get("owned") and artifact.get("key"):
                await self.storage.delete(artifact["key"])
            expired = await self.store.expire(job.id)
            if expired is not None:
                count += 1
                log.info("job.expired job_id=%s", job.id)
                self.hub.notify(expired)
        await self.store.purge(self.settings.job_retention_s)
        return count

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("TTL sweep failed")
            await asyncio.sleep(self.settings.sweep_interval_s)
