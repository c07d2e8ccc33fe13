"""The pure retry decisions: backoff, classification, allowed transitions. No event loop."""

from __future__ import annotations

import pytest

from longdl import exceptions, retry
from longdl.models import JobStatus


@pytest.mark.parametrize(("attempt", "ceiling_s"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0)])
def test_backoff_ceiling_doubles_up_to_the_cap(attempt: int, ceiling_s: float) -> None:
    """The largest delay doubles per attempt and never exceeds the cap."""
    assert ceiling_s == retry.backoff_s(attempt, 1.0, 30.0, rand=lambda: 1.0)


def test_backoff_is_full_jitter() -> None:
    """The delay is drawn from [0, ceiling]: rand 0 gives 0, rand 0.5 half the ceiling."""
    assert 0.0 == retry.backoff_s(3, 1.0, 30.0, rand=lambda: 0.0)
    assert 2.0 == retry.backoff_s(3, 1.0, 30.0, rand=lambda: 0.5)


def test_transient_error_is_retried_while_attempts_remain() -> None:
    """StorageUnavailable on attempt 1 of 3 retries; on attempt 3 of 3 it fails retryable."""
    exc = exceptions.StorageUnavailable("down")
    first = retry.decide(1, 3, exc, base_s=1, cap_s=10, rand=lambda: 0.5)
    last = retry.decide(3, 3, exc, base_s=1, cap_s=10)
    assert (True, 0.5, "STORAGE_UNAVAILABLE") == (first.retry, first.delay_s, first.code)
    assert (False, "STORAGE_UNAVAILABLE", True) == (last.retry, last.code, last.retryable)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (exceptions.JobFailed("FILE_NOT_FOUND", "gone"), "FILE_NOT_FOUND"),
        (exceptions.ObjectNotFound("downloads/1.zip"), "FILE_NOT_FOUND"),
        (exceptions.StorageError("AccessDenied"), "STORAGE_ERROR"),
        (TimeoutError(), "TIMEOUT"),
    ],
)
def test_permanent_errors_fail_at_once(exc: Exception, code: str) -> None:
    """Non-retryable errors fail on the first attempt with their code."""
    decision = retry.decide(1, 3, exc, base_s=1, cap_s=10)
    assert (False, code, False) == (decision.retry, decision.code, decision.retryable)


def test_unexpected_error_hides_internals() -> None:
    """A bug's message never reaches the client; it is retried as INTERNAL_ERROR."""
    decision = retry.decide(1, 3, RuntimeError("secret path /etc/x"), base_s=1, cap_s=10)
    assert ("INTERNAL_ERROR", True) == (decision.code, decision.retry)
    assert "secret" not in decision.message


def test_finished_jobs_only_move_to_expired() -> None:
    """No status leads back out of completed, failed or canceled except expired."""
    for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED):
        assert {JobStatus.EXPIRED} == set(retry.TRANSITIONS[status])
    assert not retry.can_transition(JobStatus.EXPIRED, JobStatus.QUEUED)
    assert retry.can_transition(JobStatus.RUNNING, JobStatus.QUEUED)
