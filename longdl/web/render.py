"""Turn job records into the v1 resources: links, signed URLs, poll hints, ETags."""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

from aiohttp import web

from longdl.models import (
    ErrorOut,
    InitiateOut,
    Job,
    JobOut,
    JobStatus,
    LinksOut,
    ProgressOut,
    ResultOut,
    TimestampsOut,
    utc_iso,
)
from longdl.storage import SignedUrl
from longdl.web import keys

QUEUED_POLL_MS = 2000
MIN_POLL_MS = 500
MAX_POLL_MS = 5000


def links(job_id: str) -> LinksOut:
    return LinksOut(
        self=f"/v1/download/status/{job_id}",
        result=f"/v1/download/{job_id}",
        events=f"/v1/download/{job_id}/events",
        cancel=f"/v1/download/cancel/{job_id}",
    )


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
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:20]
    return f'W/"{digest}"'


def absolute(request: web.Request, url: str) -> str:
    """Make a storage URL absolute when PUBLIC_URL is set; S3 URLs already are."""
    public_url = request.app[keys.SETTINGS].public_url
    if url.startswith("/") and public_url:
        return public_url.rstrip("/") + url
    return url


async def sign_result(request: web.Request, job: Job) -> SignedUrl | None:
    """A fresh signed URL for a completed job's artifact, or None."""
    if job.status is not JobStatus.COMPLETED or not job.result:
        return None
    settings = request.app[keys.SETTINGS]
    signed = await request.app[keys.STORAGE].signed_url(
        job.result["key"], settings.signed_url_ttl_s, job.result["filename"]
    )
    return SignedUrl(absolute(request, signed.url), signed.expires_at)


def elapsed_s(job: Job, now: float) -> float:
    if job.started_at is None:
        return 0.0
    end = job.finished_at if job.finished_at is not None else now
    return round(max(0.0, end - job.started_at), 3)


async def job_out(request: web.Request, job: Job) -> JobOut:
    """The full job resource, with a URL signed now when it is completed."""
    return resource(job, await sign_result(request, job))


def resource(job: Job, signed: SignedUrl | None, now: float | None = None) -> JobOut:
    """The job resource with ``signed`` as its download URL (None: no URL); no I/O."""
    now = time.time() if now is None else now
    result = None
    if job.result:
        details: dict[str, Any] = job.result.get("details") or {}
        result = ResultOut(
            url=signed.url if signed else None,
            expiresAt=utc_iso(signed.expires_at) if signed else None,
            filename=job.result["filename"],
            size=job.result["size_bytes"],
            sha256=job.result.get("sha256"),
            files=details.get("files", []),
            missing=details.get("missing", []),
        )
    error = ErrorOut(**job.error) if job.error and job.status is not JobStatus.COMPLETED else None
    file_ids = list(job.payload.get("file_ids", []))
    return JobOut(
        jobId=job.id,
        status=job.status,
        fileIds=file_ids,
        totalFileIds=len(file_ids),
        progress=ProgressOut(**job.progress.to_dict()),
        attempts=job.attempts,
        maxAttempts=job.max_attempts,
        priority=job.priority.label,  # type: ignore[arg-type]
        userId=job.user_id,
        clientRequestId=job.client_request_id,
        timestamps=TimestampsOut(
            queuedAt=utc_iso(job.created_at) or "",
            startedAt=utc_iso(job.started_at),
            updatedAt=utc_iso(job.updated_at) or "",
            finishedAt=utc_iso(job.finished_at),
        ),
        elapsedSeconds=elapsed_s(job, now),
        downloadUrl=signed.url if signed else None,
        result=result,
        error=error,
        expiresAt=utc_iso(job.expires_at),
        nextPollInMs=next_poll_ms(job, now),
        links=links(job.id),
    )


def initiate_out(job: Job) -> InitiateOut:
    job_links = links(job.id)
    return InitiateOut(
        jobId=job.id,
        status=job.status,
        totalFileIds=len(job.payload.get("file_ids", [])),
        statusUrl=job_links.self,
        resultUrl=job_links.result,
        eventsUrl=job_links.events,
        nextPollInMs=next_poll_ms(job) or QUEUED_POLL_MS,
        expiresAt=utc_iso(job.expires_at),
    )
