"""Answers about jobs: the resource (see :mod:`longdl.resource`) with its signed URL,
validator and poll hints, as HTTP responses.

A completed job's download URL is signed at read time, as the contract says, but a
signed URL is reused for a tenth of its lifetime: every URL handed out still has at
least nine tenths of ``SIGNED_URL_TTL_S`` ahead of it, and a burst of polls of one job
costs one signature (an HMAC locally, a presign on S3), not one each.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from typing import Any

from aiohttp import hdrs, web
from pydantic import BaseModel

from longdl import resource
from longdl.models import Job, JobStatus
from longdl.resource import dumps, etag, links, next_poll_ms, retry_after_s
from longdl.storage import SignedUrl, Storage
from longdl.web import keys

#: Share of a signed URL's lifetime it is reused for.
REUSE_SHARE = 0.1

JSON = "application/json"

__all__ = [
    "SIGNED_URLS",
    "VIEWS",
    "SignedUrls",
    "absolute",
    "dumps",
    "etag",
    "job_body",
    "json_response",
    "links",
    "next_poll_ms",
    "poll_headers",
    "retry_after_s",
    "sign_result",
]


class SignedUrls:
    """Signed URLs of artifacts, each reused while nine tenths of its life remain."""

    def __init__(self, ttl_s: int, size: int = 20_000) -> None:
        self.ttl_s = ttl_s
        self._size = size
        self._urls: dict[tuple[str, str], SignedUrl] = {}

    async def get(self, storage: Storage, key: str, filename: str) -> SignedUrl:
        now = time.time()
        cached = self._urls.get((key, filename))
        if cached is not None and cached.expires_at - now >= self.ttl_s * (1 - REUSE_SHARE):
            return cached
        signed = await storage.signed_url(key, self.ttl_s, filename)
        if len(self._urls) >= self._size:
            del self._urls[next(iter(self._urls))]
        self._urls[(key, filename)] = signed
        return signed


VIEWS = web.AppKey("job_views", resource.Views)
SIGNED_URLS = web.AppKey("signed_urls", SignedUrls)


def install(app: web.Application, ttl_s: int) -> None:
    app[VIEWS] = resource.Views()
    app[SIGNED_URLS] = SignedUrls(ttl_s)


def absolute(request: web.Request, url: str) -> str:
    """Make a storage URL absolute when PUBLIC_URL is set; S3 URLs already are."""
    public_url = request.app[keys.SETTINGS].public_url
    if url.startswith("/") and public_url:
        return public_url.rstrip("/") + url
    return url


async def sign_result(request: web.Request, job: Job) -> SignedUrl | None:
    """A signed URL for a completed job's artifact, or None."""
    if job.status is not JobStatus.COMPLETED or not job.result:
        return None
    signed = await request.app[SIGNED_URLS].get(
        request.app[keys.STORAGE], job.result["key"], job.result["filename"]
    )
    return SignedUrl(absolute(request, signed.url), signed.expires_at)


def view(request: web.Request, job: Job, version: Hashable | None = None) -> resource.View:
    """The job's rendering at ``version`` (its stored version by default), kept."""
    return request.app[VIEWS].of(job, version)


async def job_body(
    request: web.Request, job: Job, job_view: resource.View | None = None
) -> dict[str, Any]:
    """The full job resource, with a signed URL when it is completed."""
    job_view = job_view or view(request, job)
    signed = await sign_result(request, job)
    if signed is None:
        return resource.body(job_view, job)
    return resource.body(job_view, job, signed.url, signed.expires_at)


async def job_bytes(request: web.Request, job: Job, job_view: resource.View) -> bytes:
    """The full job resource as JSON, its encoding shared by the polls of a tenth of a
    second (see :func:`longdl.resource.encoded`)."""
    signed = await sign_result(request, job)
    if signed is None:
        return resource.encoded(job_view, job)
    return resource.encoded(job_view, job, signed.url, signed.expires_at)


def poll_headers(job: Job, tag: str) -> dict[str, str]:
    """What every answer about a job carries, 200 or 304: its validator, no caching, and
    while it is unfinished, when to ask again."""
    headers: dict[str, str] = {hdrs.ETAG: tag, hdrs.CACHE_CONTROL: "no-cache"}
    poll_ms = next_poll_ms(job)
    if poll_ms is not None:
        headers[hdrs.RETRY_AFTER] = retry_after_s(poll_ms)
    return headers


def json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON answer of a dict (orjson) or a pydantic model."""
    data = body.model_dump_json().encode() if isinstance(body, BaseModel) else dumps(body)
    return web.Response(status=status, body=data, content_type=JSON, headers=headers)
