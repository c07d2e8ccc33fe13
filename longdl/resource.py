"""The job resource as clients see it (status route, event streams, webhooks): plain
dicts and JSON bytes, no HTTP and no I/O. The pydantic models in :mod:`longdl.models`
describe the same shapes for the OpenAPI document; tests check answers against it.

Polls are most of what a job API serves, so a job's rendering is kept per version: its
ETag and every field that does not move with the clock are computed once per change of
the job, and each answer only adds ``elapsedSeconds``, ``nextPollInMs`` and the signed
URL to a copy of them before encoding (orjson).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import orjson

from longdl.models import Job, JobStatus, utc_iso

QUEUED_POLL_MS = 2000
MIN_POLL_MS = 500
MAX_POLL_MS = 5000


def dumps(value: Any) -> bytes:
    """Compact JSON bytes (orjson: several times faster than json on these dicts)."""
    return orjson.dumps(value)


def links(job_id: str) -> dict[str, str]:
    return {
        "self": f"/v1/download/status/{job_id}",
        "result": f"/v1/download/{job_id}",
        "events": f"/v1/download/{job_id}/events",
        "cancel": f"/v1/download/cancel/{job_id}",
    }


def next_poll_ms(job: Job, now: float | None = None) -> int | None:
    """How long a polling client should wait; None once the job finished.

    Running jobs with measurable progress poll about five times over their remaining
    time, bounded to [0.5 s, 5 s]; queued jobs every 2 s.
    """
    if job.status.finished:
        return None
    if job.status is JobStatus.QUEUED or job.started_at is None:
        return QUEUED_POLL_MS
    now = time.time() if now is None else now
    percent = job.progress.percent
    if percent <= 0:
        return 1000
    elapsed_s = max(0.0, now - job.started_at)
    remaining_s = elapsed_s * (100 - percent) / percent
    return int(min(MAX_POLL_MS, max(MIN_POLL_MS, remaining_s * 1000 / 5)))


def retry_after_s(poll_ms: int | None) -> str:
    return str(max(1, math.ceil((poll_ms or 1000) / 1000)))


def etag(job: Job) -> str:
    """A weak validator that changes whenever anything a client sees changes."""
    state = [
        job.status.value,
        job.progress.to_dict(),
        job.attempts,
        job.error,
        (job.result or {}).get("key"),
        job.finished_at,
    ]
    digest = hashlib.sha256(orjson.dumps(state, option=orjson.OPT_SORT_KEYS)).hexdigest()[:20]
    return f'W/"{digest}"'


def elapsed_s(job: Job, now: float) -> float:
    if job.started_at is None:
        return 0.0
    end = job.finished_at if job.finished_at is not None else now
    return round(max(0.0, end - job.started_at), 3)


def _static(job: Job) -> dict[str, Any]:
    """Every field of the resource that does not move with the clock or a signature."""
    result = None
    if job.result:
        details: dict[str, Any] = job.result.get("details") or {}
        result = {
            "url": None,
            "expiresAt": None,
            "filename": job.result["filename"],
            "size": job.result["size_bytes"],
            "sha256": job.result.get("sha256"),
            "files": details.get("files", []),
            "missing": details.get("missing", []),
            "details": details,
        }
    error = None
    if job.error and job.status is not JobStatus.COMPLETED:
        error = {
            "code": job.error["code"],
            "message": job.error["message"],
            "retryable": job.error["retryable"],
        }
    file_ids = list(job.payload.get("file_ids", []))
    return {
        "jobId": job.id,
        "status": job.status.value,
        "fileIds": file_ids,
        "totalFileIds": len(file_ids),
        "progress": job.progress.to_dict(),
        "attempts": job.attempts,
        "maxAttempts": job.max_attempts,
        "priority": job.priority.label,
        "userId": job.user_id,
        "clientRequestId": job.client_request_id,
        "timestamps": {
            "queuedAt": utc_iso(job.created_at) or "",
            "startedAt": utc_iso(job.started_at),
            "updatedAt": utc_iso(job.updated_at) or "",
            "finishedAt": utc_iso(job.finished_at),
        },
        "elapsedSeconds": 0.0,
        "downloadUrl": None,
        "result": result,
        "error": error,
        "expiresAt": utc_iso(job.expires_at),
        "nextPollInMs": None,
        "links": links(job.id),
    }


@dataclass(frozen=True)
class View:
    """One version of a job's rendering: its ETag and its clock-free fields."""

    key: Hashable
    etag: str
    base: dict[str, Any]
    #: The last encoding, and what it was made for (see :func:`encoded`).
    last: list[Any] = field(default_factory=lambda: [None, b""])


def version_of(job: Job) -> Hashable:
    """What identifies a stored job's version: every write moves ``updated_at``."""
    return (job.status, job.updated_at, job.attempts, job.stalls)


class Views:
    """The latest :class:`View` of each job seen lately (at most ``size`` jobs)."""

    def __init__(self, size: int = 20_000) -> None:
        self._size = size
        self._views: dict[str, View] = {}

    def of(self, job: Job, key: Hashable | None = None) -> View:
        """The view of ``job`` at version ``key`` (by default its stored version)."""
        key = version_of(job) if key is None else key
        view = self._views.get(job.id)
        if view is not None and view.key == key:
            return view
        view = View(key, etag(job), _static(job))
        if len(self._views) >= self._size:
            del self._views[next(iter(self._views))]  # the oldest entry goes
        self._views[job.id] = view
        return view


def body(
    view: View,
    job: Job,
    signed_url: str | None = None,
    signed_expires_at: float | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The full resource: ``view`` with what moves with the clock, and the signed URL."""
    now = time.time() if now is None else now
    out = dict(view.base)
    out["elapsedSeconds"] = elapsed_s(job, now)
    out["nextPollInMs"] = next_poll_ms(job, now)
    if signed_url is not None and out["result"] is not None:
        out["downloadUrl"] = signed_url
        out["result"] = {
            **out["result"],
            "url": signed_url,
            "expiresAt": utc_iso(signed_expires_at),
        }
    return out


#: The answers of one job version within this long share their encoding: the
#: elapsedSeconds of a running job then lags the clock by up to this much.
ENCODING_REUSE_S = 0.1


def encoded(
    view: View,
    job: Job,
    signed_url: str | None = None,
    signed_expires_at: float | None = None,
    now: float | None = None,
) -> bytes:
    """:func:`body` as JSON bytes, encoded once per version, signed URL and tenth of a
    second (a burst of polls of one job encodes once)."""
    now = time.time() if now is None else now
    finished = job.status.finished
    tick = None if finished else int(now / ENCODING_REUSE_S)
    marker = (signed_url, tick)
    if view.last[0] == marker:
        return view.last[1]  # type: ignore[no-any-return]
    data = dumps(body(view, job, signed_url, signed_expires_at, now))
    view.last[0], view.last[1] = marker, data
    return data


def job_dict(job: Job, signed_url: str | None = None, signed_expires_at: float | None = None,
             now: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The resource of ``job`` without a cache (webhooks, one-off answers)."""
    view = View(None, etag(job), _static(job))
    return body(view, job, signed_url, signed_expires_at, now)


def initiate_dict(job: Job) -> dict[str, Any]:
    """The 202 answer to an initiate."""
    job_links = links(job.id)
    return {
        "jobId": job.id,
        "status": job.status.value,
        "totalFileIds": len(job.payload.get("file_ids", [])),
        "statusUrl": job_links["self"],
        "resultUrl": job_links["result"],
        "eventsUrl": job_links["events"],
        "nextPollInMs": next_poll_ms(job) or QUEUED_POLL_MS,
        "expiresAt": utc_iso(job.expires_at),
    }
