"""Every error longdl raises on purpose derives from :class:`LongdlError`.

::

    LongdlError
    ├── StorageError               storage refused a request; not worth retrying
    │   ├── ObjectNotFound         the key does not exist
    │   └── StorageUnavailable     transient: connection, timeout, 5xx, throttling
    │       └── StorageFull        no space left for the object (ENOSPC, quota)
    ├── StoreUnavailable           the job database cannot take this write now
    │   ├── StoreBusy              another process held the write lock too long
    │   └── StoreFull              the disk under the database is full
    ├── JobFailed                  a handler gives up with a code for the client
    ├── JobNotFound                no such job (or not the caller's)
    ├── JobFinished                the job already reached a final status
    ├── IdempotencyMismatch        same idempotency key, different request
    ├── Overloaded                 back-pressure: too many queued jobs
    │   └── TooManyActiveJobs      one caller has too many unfinished jobs
    ├── InvalidSignature           a signed URL was tampered with or expired
    ├── WebhookTargetRefused       a callback URL points at a private or loopback address
    ├── InvalidWebhook             a webhook's signature or timestamp does not verify
    └── InvalidSecret              a secret in DATA_DIR is empty, short or malformed
"""

from __future__ import annotations


class LongdlError(Exception):
    """Root of longdl's errors."""


class StorageError(LongdlError):
    """Storage refused a request in a way retrying will not fix."""


class ObjectNotFound(StorageError):
    """The key does not exist in storage."""


class StorageUnavailable(StorageError):
    """Storage could not be reached or asked us to slow down; worth retrying."""


class StorageFull(StorageUnavailable):
    """Storage has no room for the object now; freeing space fixes it."""


class StoreUnavailable(LongdlError):
    """The job database cannot take a write now; nothing was changed.

    Args:
        message: human text for logs and the client.
        retry_after_s: a hint for the client's next attempt.
    """

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unstorable(LongdlError):
    """The job database refused a value of the request itself (text holding a NUL
    character, which PostgreSQL cannot store); nothing was changed, and only a different
    request can succeed."""


class StoreBusy(StoreUnavailable):
    """Another process held the database's write lock past ``DB_BUSY_TIMEOUT_MS``."""


class StoreFull(StoreUnavailable):
    """The disk holding the database is full (SQLITE_FULL, ENOSPC)."""


class JobFailed(LongdlError):
    """A handler's reason to fail a job, reported to the client as ``error``.

    Args:
        code: stable machine-readable code, e.g. ``FILE_NOT_FOUND``.
        message: human text.
        retryable: whether another attempt could succeed.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class JobNotFound(LongdlError):
    """No job with this id is visible to the caller."""


class JobFinished(LongdlError):
    """The job already finished; it can no longer be canceled."""

    def __init__(self, status: str) -> None:
        super().__init__(f"job already {status}")
        self.status = status


class IdempotencyMismatch(LongdlError):
    """The idempotency key was used before with a different request body."""


class Overloaded(LongdlError):
    """Too many jobs are waiting; the caller should come back later."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyActiveJobs(Overloaded):
    """The caller already has as many unfinished jobs as allowed."""


class InvalidSignature(LongdlError):
    """A signed URL's signature does not match or it has expired."""


class WebhookTargetRefused(LongdlError):
    """A callback URL names a host webhooks may not reach (SSRF guard).

    Private, loopback, link-local, multicast and unspecified addresses are refused
    unless the host is in ``WEBHOOK_ALLOW_HOSTS``.
    """


class InvalidWebhook(LongdlError):
    """A received webhook's headers, timestamp or signature do not verify."""


class InvalidSecret(LongdlError):
    """A secret kept in DATA_DIR cannot be used (empty, short or malformed); the service
    refuses to start rather than sign with it. The message says what to do."""
