"""Pure decisions about failures and status changes; no I/O, no clock, no event loop."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from longdl import exceptions
from longdl.models import JobStatus

#: Which status may follow which. The store enforces these in its UPDATE statements.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.PROCESSING_ARTIFACTS,
            JobStatus.QUEUED,
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.CANCELED,
        }
    ),
    JobStatus.PROCESSING_ARTIFACTS: frozenset(
        {JobStatus.QUEUED, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED}
    ),
    JobStatus.COMPLETED: frozenset({JobStatus.EXPIRED}),
    JobStatus.FAILED: frozenset({JobStatus.EXPIRED}),
    JobStatus.CANCELED: frozenset({JobStatus.EXPIRED}),
    JobStatus.EXPIRED: frozenset(),
}


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    """Whether a job in ``current`` may move to ``new``."""
    return new in TRANSITIONS[current]


def sources_of(new: JobStatus) -> list[JobStatus]:
    """Statuses a job may move to ``new`` from, in declaration order."""
    return [status for status, targets in TRANSITIONS.items() if new in targets]


def backoff_s(
    attempt: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay before retrying after ``attempt`` failed: exponential with full jitter.

    Args:
        attempt: the attempt that just failed, counting from 1.
        base_s: ceiling of the first delay.
        cap_s: ceiling of every delay.
        rand: uniform source in [0, 1), injectable for tests.

    Returns:
        A delay drawn uniformly from ``[0, min(cap_s, base_s * 2 ** (attempt - 1))]``.
    """
    ceiling: float = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return rand() * ceiling


@dataclass(frozen=True)
class Decision:
    """What to do with a job whose attempt raised."""

    #: Run it again after ``delay_s``; otherwise it fails.
    retry: bool
    delay_s: float
    code: str
    message: str
    retryable: bool


def classify(exc: BaseException) -> tuple[str, str, bool]:
    """Map an exception to ``(code, message, retryable)`` for the client."""
    if isinstance(exc, exceptions.JobFailed):
        return exc.code, exc.message, exc.retryable
    if isinstance(exc, exceptions.StorageFull):
        return "STORAGE_FULL", "Storage is full; the job will try again", True
    if isinstance(exc, exceptions.StoreFull):
        return "DISK_FULL", "The service's disk is full; the job will try again", True
    if isinstance(exc, exceptions.StoreUnavailable):
        return "DATABASE_UNAVAILABLE", f"The job database is unavailable: {exc}", True
    if isinstance(exc, exceptions.StorageUnavailable):
        return "STORAGE_UNAVAILABLE", f"Storage is unavailable: {exc}", True
    if isinstance(exc, exceptions.ObjectNotFound):
        return "FILE_NOT_FOUND", str(exc) or "File not found", False
    if isinstance(exc, exceptions.StorageError):
        return "STORAGE_ERROR", f"Storage refused the request: {exc}", False
    if isinstance(exc, TimeoutError):
        return "TIMEOUT", "The job took longer than its time limit", False
    # An unexpected bug: retry (it may be a transient condition we did not foresee),
    # but never show internals to the client.
    return "INTERNAL_ERROR", "The job failed unexpectedly", True


def decide(
    attempts: int,
    max_attempts: int,
    exc: BaseException,
    *,
    base_s: float,
    cap_s: float,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """Retry or fail a job whose attempt number ``attempts`` raised ``exc``."""
    code, message, retryable = classify(exc)
    if retryable and attempts < max_attempts:
        return Decision(True, backoff_s(attempts, base_s, cap_s, rand), code, message, True)
    return Decision(False, 0.0, code, message, retryable)
