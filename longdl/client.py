"""Python client of the v1 API: :class:`LongdlClient` (asyncio) and :class:`SyncClient`.

::

    async with LongdlClient("http://localhost:3000") as client:
        job = await client.initiate([70000, 70007])
        await client.wait(job.jobId, on_progress=lambda j: print(j.progress.percent))
        await client.download(job.jobId, "bundle.zip")

``wait`` follows the job over Server-Sent Events and falls back to polling (long-poll,
honouring the server's ``nextPollInMs``) when the events route is missing or the stream
keeps breaking. ``download`` fetches a freshly signed URL, streams it into
``<path>.part``, resumes that file with a ``Range`` request after an interruption, and
checks size and sha256 before renaming it into place.

Errors raised here derive from :class:`ClientError`, under the package's one root
:class:`longdl.exceptions.LongdlError`::

    ClientError
    ├── ApiError                 the server answered with a problem (status, code, detail, errors)
    │   ├── InvalidRequestError  400, 413, 415, 422: the request was refused as invalid
    │   └── NotFoundError        404: no such job (or not the caller's)
    ├── JobFailedError           the job ended failed, canceled or expired (code, message)
    ├── ConnectionError          the server could not be reached after retries (an OSError too)
    ├── WaitTimeoutError         wait() ran out of time (a TimeoutError too)
    └── IntegrityError           the downloaded file has the wrong size or sha256
"""

from __future__ import annotations

import asyncio
import builtins
import codecs
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import aiohttp
import pydantic
from yarl import URL

from longdl import exceptions, models, retry

log = logging.getLogger("longdl.client")

T = TypeVar("T")

PriorityName = Literal["low", "normal", "high"]
JobCallback = Callable[[models.JobOut], object]
TransferCallback = Callable[["Transfer"], object]

#: Answers worth asking again after a pause (overload, rate limit, a proxy's hiccup).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Answers meaning "your request is wrong", as opposed to "not found" or a server failure.
INVALID_REQUEST_STATUSES = frozenset({400, 413, 415, 422})
#: Retries of one request after a network error or a retryable status.
DEFAULT_RETRIES = 4
#: First backoff ceiling; doubles per attempt (full jitter).
BACKOFF_BASE_S = 0.25
#: Backoff ceiling.
BACKOFF_MAX_S = 5.0
#: A Retry-After longer than this is not waited for: the error goes to the caller.
MAX_RETRY_AFTER_S = 30.0
#: ``?wait=`` of a long-poll; servers cap it (25 s by default), under proxy timeouts.
LONG_POLL_S = 20.0
#: Heartbeats come at least every 15 s; a silent stream after this is dead.
SSE_READ_TIMEOUT_S = 45.0
#: Event stream connections in a row that fail (error, 5xx) before falling back to polling.
SSE_MAX_FAILURES = 3
#: Read size of a download.
CHUNK_BYTES = 256 * 1024
#: Fresh signed URLs fetched in one download after the server refused one (expired).
MAX_LINK_REFRESHES = 3
#: Connection and read limits; no total limit, streams and downloads may take long.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


# --- errors ----------------------------------------------------------------------------


class ClientError(exceptions.LongdlError):
    """Root of the client's errors."""


class ApiError(ClientError):
    """The server refused a request with an ``application/problem+json`` answer.

    Attributes:
        status: HTTP status.
        title: short summary of the problem type.
        detail: human explanation of this occurrence.
        code: stable machine-readable code (``JOB_NOT_FOUND``, ``VALIDATION_ERROR``...).
        errors: ``(field, message)`` pairs of a validation problem.
        request_id: the server's ``X-Request-ID``, to find the request in its logs.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        code: str | None = None,
        errors: Sequence[tuple[str, str]] = (),
        request_id: str | None = None,
        type: str = "about:blank",
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.code = code
        self.errors = list(errors)
        self.request_id = request_id
        self.type = type
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line for a person: detail (or title) and the field errors."""
        text = self.detail or self.title
        if self.errors:
            text += ": " + "; ".join(f"{name}: {message}" for name, message in self.errors)
        return text


class InvalidRequestError(ApiError):
    """The server refused the request as invalid (bad ids, bad body, reused key)."""


class NotFoundError(ApiError):
    """No such job, or it belongs to another caller."""


class JobFailedError(ClientError):
    """The job ended without a result: failed, canceled or expired.

    Attributes:
        code: the job's error code (``FILE_NOT_FOUND``, ``TIMEOUT``...) or its status in
            capitals when it carries no error (``CANCELED``, ``EXPIRED``).
        message: human text.
        status: the job's final status when known.
        job: the job resource when known.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: models.JobStatus | None = None,
        job: models.JobOut | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.job = job

    @classmethod
    def from_job(cls, job: models.JobOut) -> JobFailedError:
        if job.error is not None:
            return cls(job.error.code, job.error.message, status=job.status, job=job)
        return cls(
            job.status.value.upper(), f"The job is {job.status.value}", status=job.status, job=job
        )


class ConnectionError(ClientError, builtins.ConnectionError):
    """The server could not be reached (or kept dropping the connection) after retries."""


class WaitTimeoutError(ClientError, builtins.TimeoutError):
    """``wait`` gave up before the job finished; the job itself goes on."""


class IntegrityError(ClientError):
    """The downloaded file does not have the size or sha256 the server announced."""


# --- pure helpers ----------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; a date without a zone is malformed
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class ContentRange:
    """A parsed ``Content-Range: bytes start-end/total`` (total None when ``*``)."""

    start: int
    end: int
    total: int | None


def parse_content_range(value: str | None) -> ContentRange | None:
    """Parse a byte ``Content-Range`` of a 206 answer; None when absent or malformed."""
    if not value:
        return None
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not first.isdigit() or not last.isdigit():
        return None
    if total != "*" and not total.isdigit():
        return None
    start, end = int(first), int(last)
    if end < start:
        return None
    return ContentRange(start, end, None if total == "*" else int(total))


@dataclass(frozen=True)
class SseEvent:
    """One dispatched Server-Sent Event."""

    #: ``event:`` field; "message" when the server sent none.
    event: str = "message"
    #: ``data:`` lines joined with newlines.
    data: str = ""
    #: ``id:`` field of this event, or None when it had none.
    id: str | None = None
    #: ``retry:`` reconnection delay the server asked for.
    retry_ms: int | None = None


@dataclass
class SseParser:
    """Incremental ``text/event-stream`` parser (WHATWG HTML, "event stream interpretation").

    Feed it bytes as they arrive; it returns the events completed so far. Comment lines
    (``:`` heartbeats) produce nothing; CRLF, LF and CR all end a line.
    """

    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _buffer: str = ""
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None
    _retry_ms: int | None = None
    _id_seen: bool = False
    _started: bool = False
    _after_cr: bool = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Parse ``chunk``; return the events it completed."""
        return self.feed_text(self._decoder.decode(chunk))

    def feed_text(self, text: str) -> list[SseEvent]:
        """Parse already decoded text; return the events it completed."""
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr and text:
            # The previous chunk ended in CR: a LF opening this one belongs to that CRLF.
            self._after_cr = False
            text = text.removeprefix("\n")
        self._buffer += text
        events: list[SseEvent] = []
        start = 0
        for index, char in enumerate(self._buffer):
            if index < start or char not in "\r\n":
                continue
            event = self._line(self._buffer[start:index])
            if event is not None:
                events.append(event)
            start = index + 1
            if char == "\r":
                if index + 1 == len(self._buffer):
                    self._after_cr = True
                elif self._buffer[index + 1] == "\n":
                    start += 1
        self._buffer = self._buffer[start:]
        return events

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
            self._id_seen = True
        elif name == "retry" and value.isdigit():
            self._retry_ms = int(value)
        return None

    def _dispatch(self) -> SseEvent | None:
        event = SseEvent(
            event=self._event or "message",
            data="\n".join(self._data),
            id=self._id,
            retry_ms=self._retry_ms,
        )
        # An event with only an id or retry still moves the reconnection state; the id
        # itself persists across events (it is what Last-Event-ID resends).
        has_content = bool(self._data) or self._retry_ms is not None or self._id_seen
        self._event, self._data, self._retry_ms, self._id_seen = "", [], None, False
        return event if has_content else None


def parse_sse(text: str) -> list[SseEvent]:
    """Every complete event of an event-stream text (an unterminated last one is dropped)."""
    return SseParser().feed_text(text)


def part_path(path: Path) -> Path:
    """Where the download of ``path`` accumulates until it is complete."""
    return path.with_name(path.name + ".part")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


# --- results ---------------------------------------------------------------------------


class Initiated(models.InitiateOut):
    """The 202 answer to initiate, and whether the server replayed an earlier job."""

    #: True when the idempotency key matched an earlier request: this is that job.
    replayed: bool = False


@dataclass(frozen=True)
class HistoryPage:
    """One page of ``GET /v1/download/history``, newest first."""

    items: list[models.JobOut]
    #: Pass back as ``cursor`` for the next page; None on the last page.
    next_cursor: str | None


@dataclass(frozen=True)
class Transfer:
    """Progress of a download."""

    bytes_done: int
    bytes_total: int
    #: Bytes already in the ``.part`` file when this download started (0 when fresh).
    resumed_from_bytes: int = 0


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


# --- the client ------------------------------------------------------------------------


class LongdlClient:
    """Async client of one longdl server.

    Args:
        base_url: the service root, e.g. ``http://localhost:3000`` (a path prefix is kept).
        api_key: sent as ``Authorization: Bearer`` to the service (never to storage URLs
            on another origin, which carry their own signature).
        session: an ``aiohttp.ClientSession`` to use; the client makes (and closes) its
            own when omitted.
        retries: retries of one request after a network error or a 429/502/503/504.
        backoff_base_s: first backoff ceiling of those retries.
        long_poll_s: ``?wait=`` of status polls when polling.
        use_sse: follow jobs over the events route first (polling when it is missing).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        retries: int = DEFAULT_RETRIES,
        backoff_base_s: float = BACKOFF_BASE_S,
        long_poll_s: float = LONG_POLL_S,
        use_sse: bool = True,
    ) -> None:
        base = URL(base_url.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = str(base)
        self._origin = base.origin()
        self.api_key = api_key
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.long_poll_s = long_poll_s
        self.use_sse = use_sse
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> LongdlClient:
        self.session  # noqa: B018 - create the session inside the running loop
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=DEFAULT_TIMEOUT)
        return self._session

    async def close(self) -> None:
        """Close the session the client made (a session passed in stays open)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # --- plumbing ----------------------------------------------------------------------

    def url_for(self, path_or_url: str) -> URL:
        """Absolute URL of a service path (``/v1/...``, ``/files/...``) or an absolute URL.

        Both are taken as already encoded: signed URLs must reach the server byte for
        byte or their signature no longer matches.
        """
        if "://" in path_or_url:
            return URL(path_or_url, encoded=True)
        return URL(self.base_url + path_or_url, encoded=True)

    def _headers(self, url: URL, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key and url.origin() == self._origin:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(extra or {})
        return headers

    async def _pause(self, attempt: int) -> None:
        await asyncio.sleep(retry.backoff_s(attempt + 1, self.backoff_base_s, BACKOFF_MAX_S))

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Answer:
        """One request with retries; returns the answer read in full.

        Raises:
            ConnectionError: no answer after ``retries`` retries.
        """
        url = self.url_for(path)
        for attempt in range(self.retries + 1):
            try:
                async with self.session.request(
                    method, url, json=json_body, params=params, headers=self._headers(url, headers)
                ) as response:
                    answer = _Answer(response.status, response.headers, await response.read())
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("request failed method=%s url=%s error=%r", method, url, exc)
                if attempt >= self.retries:
                    raise ConnectionError(f"cannot reach {self.base_url}: {_reason(exc)}") from exc
                await self._pause(attempt)
                continue
            if answer.status in RETRY_STATUSES and attempt < self.retries:
                delay_s = parse_retry_after(answer.headers.get("Retry-After"))
                if delay_s is None:
                    delay_s = retry.backoff_s(attempt + 1, self.backoff_base_s, BACKOFF_MAX_S)
                if delay_s <= MAX_RETRY_AFTER_S:
                    await asyncio.sleep(delay_s)
                    continue
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _job_path(self, template: str, job_id: str) -> str:
        return template.format(quote(job_id, safe=""))

    # --- API ---------------------------------------------------------------------------

    async def initiate(
        self,
        file_ids: Sequence[int],
        *,
        strict: bool = False,
        priority: PriorityName = "normal",
        user_id: str | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> Initiated:
        """Start a download job.

        Every call carries an ``Idempotency-Key`` (a fresh one when none is given), so a
        retry after a lost answer returns the same job instead of starting another.

        Raises:
            InvalidRequestError: bad ids or options; ``errors`` says which.
        """
        body: dict[str, Any] = {"file_ids": list(file_ids), "strict": strict, "priority": priority}
        if user_id is not None:
            body["userId"] = user_id
        if callback_url is not None:
            body["callbackUrl"] = callback_url
        key = idempotency_key or f"longdl-client-{os.urandom(16).hex()}"
        answer = await self._send(
            "POST",
            "/v1/download/initiate",
            json_body=body,
            headers={"Idempotency-Key": key},
        )
        if answer.status not in (200, 201, 202):
            raise _api_error(answer)
        data = json.loads(answer.body)
        data["replayed"] = answer.headers.get("Idempotent-Replayed", "").lower() == "true"
        return Initiated.model_validate(data)

    async def status(self, job_id: str) -> models.JobOut:
        """The job resource as it is now.

        Raises:
            NotFoundError: no such job.
        """
        answer = await self._send("GET", self._job_path("/v1/download/status/{}", job_id))
        if answer.status != 200:
            raise _api_error(answer)
        return models.JobOut.model_validate_json(answer.body)

    async def cancel(self, job_id: str) -> models.JobOut:
        """Cancel a queued or running job; returns it (status ``canceled``).

        Raises:
            NotFoundError: no such job.
            ApiError: 409 when it already finished.
        """
        answer = await self._send("POST", self._job_path("/v1/download/cancel/{}", job_id))
        if answer.status != 200:
            raise _api_error(answer)
        return models.JobOut.model_validate_json(answer.body)

    async def history(
        self,
        user_id: str | None = None,
        status: str | Sequence[str] | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> HistoryPage:
        """One page of the caller's jobs, newest first.

        Args:
            user_id: only this user's jobs.
            status: only jobs in this status (or any of these).
            limit: page size (the server allows 1..100).
            cursor: ``next_cursor`` of the previous page.
        """
        params = {"limit": str(limit)}
        if user_id is not None:
            params["userId"] = user_id
        if status:
            params["status"] = status if isinstance(status, str) else ",".join(status)
        if cursor is not None:
            params["cursor"] = cursor
        answer = await self._send("GET", "/v1/download/history", params=params)
        if answer.status != 200:
            raise _api_error(answer)
        page = models.HistoryOut.model_validate_json(answer.body)
        return HistoryPage(items=page.items, next_cursor=page.nextCursor)

    async def result_link(self, job_id: str) -> models.ResultLinkOut | None:
        """A freshly signed URL of the job's result; None while the job is unfinished.

        Raises:
            JobFailedError: the job failed, was canceled or expired.
            NotFoundError: no such job.
        """
        answer = await self._send(
            "GET", self._job_path("/v1/download/{}", job_id), params={"redirect": "false"}
        )
        if answer.status == 200:
            return models.ResultLinkOut.model_validate_json(answer.body)
        if answer.status == 202:
            return None
        error = _api_error(answer)
        if answer.status in (409, 410):
            raise JobFailedError(error.code or "JOB_FAILED", error.detail or error.title)
        raise error

    # --- waiting -----------------------------------------------------------------------

    async def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        on_progress: JobCallback | None = None,
    ) -> models.JobOut:
        """Wait until the job finishes; return it completed.

        Follows the events stream (reconnecting with ``Last-Event-ID``) and polls the
        status route instead when the server has no events route or the stream keeps
        breaking. ``on_progress`` gets every job resource seen on the way.

        Raises:
            JobFailedError: it failed, was canceled or expired.
            NotFoundError: no such job.
            WaitTimeoutError: it did not finish within ``timeout_s``.
        """
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                job = await self._wait_sse(job_id, on_progress) if self.use_sse else None
                if job is None:
                    job = await self._wait_poll(job_id, on_progress)
        except TimeoutError as exc:
            if deadline.expired():
                raise WaitTimeoutError(f"job {job_id} did not finish in {timeout_s} s") from exc
            raise
        if job.status is not models.JobStatus.COMPLETED:
            raise JobFailedError.from_job(job)
        return job

    async def _wait_sse(self, job_id: str, on_progress: JobCallback | None) -> models.JobOut | None:
        """Follow the events stream to the job's final status; None to fall back to polling."""
        url = self.url_for(self._job_path("/v1/download/{}/events", job_id))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=SSE_READ_TIMEOUT_S)
        stream = _StreamState()
        failures = 0
        while failures < SSE_MAX_FAILURES:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if stream.last_event_id is not None:
                headers["Last-Event-ID"] = stream.last_event_id
            try:
                async with self.session.get(
                    url, headers=self._headers(url, headers), timeout=timeout
                ) as response:
                    if response.status == 200 and response.content_type == "text/event-stream":
                        job = await _follow(response, stream, on_progress)
                        if job is not None:
                            return job
                        # A clean end before the final status: servers cap a stream's
                        # lifetime under proxy timeouts. Not a failure; reconnect.
                        failures = 0
                    else:
                        answer = _Answer(response.status, response.headers, await response.read())
                        if answer.status not in RETRY_STATUSES:
                            error = _api_error(answer)
                            if isinstance(error, NotFoundError) and error.code == "JOB_NOT_FOUND":
                                raise error
                            log.debug("no event stream (HTTP %d): polling", answer.status)
                            return None
                        failures += 1
            except _ForeignStream:
                log.warning("the events route does not send job resources: polling")
                return None
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("event stream broke job_id=%s error=%r", job_id, exc)
                failures += 1
            if stream.retry_ms is not None:
                await asyncio.sleep(stream.retry_ms / 1000)
            else:
                await self._pause(failures)
        log.debug("event stream keeps failing job_id=%s: polling", job_id)
        return None

    async def _wait_poll(self, job_id: str, on_progress: JobCallback | None) -> models.JobOut:
        """Poll the status route until the job finishes, long-polling between hints."""
        path = self._job_path("/v1/download/status/{}", job_id)
        etag: str | None = None
        job: models.JobOut | None = None
        while True:
            headers: dict[str, str] = {}
            params: dict[str, str] = {}
            if etag is not None:
                # Seen this state already: let the server hold the answer until it changes.
                headers["If-None-Match"] = etag
                params["wait"] = f"{self.long_poll_s:g}"
            started = time.monotonic()
            answer = await self._send("GET", path, headers=headers, params=params)
            if answer.status == 200:
                job = models.JobOut.model_validate_json(answer.body)
                etag = answer.headers.get("ETag")
                if on_progress is not None:
                    on_progress(job)
                if job.status.finished:
                    return job
            elif answer.status != 304 or job is None:
                raise _api_error(answer)
            hint_s = parse_retry_after(answer.headers.get("Retry-After")) or 1.0
            if answer.status == 200 and job.nextPollInMs is not None:
                hint_s = job.nextPollInMs / 1000
            # Honour the server's pace, counting the time it already held the request.
            await asyncio.sleep(max(0.0, hint_s - (time.monotonic() - started)))

    # --- downloading -------------------------------------------------------------------

    async def download(
        self,
        job_id: str,
        path: str | os.PathLike[str],
        *,
        on_progress: TransferCallback | None = None,
        on_job_progress: JobCallback | None = None,
        max_rate_bytes_s: float | None = None,
    ) -> Path:
        """Download the job's result to ``path`` (a folder: the result's file name in it).

        Waits for the job first if it is unfinished. Bytes go to ``<path>.part``; an
        existing ``.part`` is resumed with a ``Range`` request, and the file is renamed
        into place only once its size (and sha256, for bundles) checks out.

        Args:
            on_progress: gets a :class:`Transfer` after every chunk.
            on_job_progress: gets the job resource while waiting for it.
            max_rate_bytes_s: throttle the transfer (None: as fast as it goes).

        Returns:
            The path written.

        Raises:
            JobFailedError: the job failed, was canceled or expired.
            IntegrityError: the bytes do not match the announced size or sha256.
        """
        job = await self.status(job_id)
        if not job.status.finished:
            job = await self.wait(job_id, on_progress=on_job_progress)
        if job.status is not models.JobStatus.COMPLETED:
            raise JobFailedError.from_job(job)
        link = await self.result_link(job_id)
        if link is None:  # pragma: no cover - completed jobs stay completed until expiry
            raise JobFailedError("NOT_READY", "The job has no result yet")
        target = Path(path)
        if await asyncio.to_thread(target.is_dir):
            target = target / link.filename
        part = part_path(target)
        sha256 = job.result.sha256 if job.result is not None else None
        for fresh in (False, True):
            resumed_from = await self._transfer(
                job_id, link, part, on_progress=on_progress, max_rate_bytes_s=max_rate_bytes_s
            )
            problem = await asyncio.to_thread(_check_file, part, link.size, sha256)
            if problem is None:
                await asyncio.to_thread(os.replace, part, target)
                return target
            await asyncio.to_thread(part.unlink, missing_ok=True)
            if fresh or resumed_from == 0:
                raise IntegrityError(f"{target.name}: {problem}")
            # The .part held bytes of another artifact (an older job): start over once.
            log.info("resumed file did not verify (%s): downloading again", problem)
            fresh_link = await self.result_link(job_id)
            link = fresh_link or link
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transfer(
        self,
        job_id: str,
        link: models.ResultLinkOut,
        part: Path,
        *,
        on_progress: TransferCallback | None,
        max_rate_bytes_s: float | None,
    ) -> int:
        """Fill ``part`` up to ``link.size`` bytes, resuming it; return where it resumed."""
        size = link.size
        offset = await asyncio.to_thread(_resume_offset, part, size)
        resumed_from = offset
        refreshes = 0
        failures = 0
        chunk_bytes = CHUNK_BYTES
        if max_rate_bytes_s:
            chunk_bytes = max(1024, min(CHUNK_BYTES, int(max_rate_bytes_s / 10)))
        if on_progress is not None:
            on_progress(Transfer(offset, size, resumed_from))
        while offset < size:
            url = self.url_for(link.url)
            # identity: ranges count bytes of the file itself, not of a compressed form.
            headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                async with self.session.get(url, headers=self._headers(url, headers)) as response:
                    if response.status == 206:
                        span = parse_content_range(response.headers.get("Content-Range"))
                        if span is None or span.start != offset:
                            log.info("unexpected Content-Range %r: starting over", span)
                            offset = 0
                            await asyncio.to_thread(part.unlink, missing_ok=True)
                            continue
                        mode = "ab"
                    elif response.status == 200:
                        if offset:
                            log.info("server ignored the range: starting over")
                        offset, mode = 0, "wb"
                    elif response.status == 416:
                        offset = 0
                        await asyncio.to_thread(part.unlink, missing_ok=True)
                        continue
                    elif response.status in (401, 403) and refreshes < MAX_LINK_REFRESHES:
                        # Signed URLs expire; a transfer that outlived one gets a fresh one.
                        await response.read()
                        refreshes += 1
                        fresh = await self.result_link(job_id)
                        if fresh is None:  # pragma: no cover
                            raise JobFailedError("NOT_READY", "The job has no result yet")
                        link = fresh
                        continue
                    elif response.status in RETRY_STATUSES and failures < self.retries:
                        await response.read()
                        failures += 1
                        await self._pause(failures)
                        continue
                    else:
                        answer = _Answer(response.status, response.headers, await response.read())
                        raise _api_error(answer)
                    # Written synchronously on purpose: a chunk goes to the page cache in
                    # microseconds, and Ctrl-C then never leaves a write behind in a thread.
                    with part.open(mode) as fh:
                        started = time.monotonic()
                        received = 0
                        async for chunk in response.content.iter_chunked(chunk_bytes):
                            fh.write(chunk)
                            offset += len(chunk)
                            received += len(chunk)
                            failures = 0
                            if on_progress is not None:
                                on_progress(Transfer(offset, size, resumed_from))
                            if max_rate_bytes_s:
                                ahead_s = received / max_rate_bytes_s - (time.monotonic() - started)
                                if ahead_s > 0:
                                    await asyncio.sleep(ahead_s)
                    if offset < size:
                        raise aiohttp.ClientPayloadError(f"stream ended at {offset} of {size}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures += 1
                if failures > self.retries:
                    raise ConnectionError(
                        f"download of {part.name} failed: {_reason(exc)}"
                    ) from exc
                log.info("transfer broke at %d of %d bytes (%r): resuming", offset, size, exc)
                await self._pause(failures)
        return resumed_from


def _resume_offset(part: Path, size_bytes: int) -> int:
    """Bytes of ``part`` to keep: all of them, unless it is longer than the whole file."""
    try:
        offset = part.stat().st_size
    except FileNotFoundError:
        return 0
    if offset > size_bytes:
        part.unlink()
        return 0
    return offset


def _check_file(path: Path, size_bytes: int, sha256: str | None) -> str | None:
    """Why the file at ``path`` is not the announced one, or None when it is."""
    if not path.exists():
        if size_bytes == 0:
            path.touch()
            return None
        return "nothing was downloaded"
    actual_size = path.stat().st_size
    if actual_size != size_bytes:
        return f"size {actual_size} bytes, expected {size_bytes}"
    if sha256 is not None and _sha256_of(path) != sha256:
        return "sha256 does not match"
    return None


@dataclass
class _StreamState:
    """What survives a reconnection of an event stream."""

    last_event_id: str | None = None
    retry_ms: int | None = None


class _ForeignStream(Exception):
    """The events route sends data that is not a job resource: another dialect."""


async def _follow(
    response: aiohttp.ClientResponse, stream: _StreamState, on_progress: JobCallback | None
) -> models.JobOut | None:
    """Read an event stream until a finished job arrives (returned) or the stream ends.

    Raises:
        _ForeignStream: an event carried data that is not a job resource.
    """
    parser = SseParser()
    async for chunk in response.content.iter_any():
        for event in parser.feed(chunk):
            if event.id is not None:
                stream.last_event_id = event.id
            if event.retry_ms is not None:
                stream.retry_ms = event.retry_ms
            if not event.data:
                continue
            try:
                job = models.JobOut.model_validate_json(event.data)
            except pydantic.ValidationError as exc:
                raise _ForeignStream(event.event) from exc
            if on_progress is not None:
                on_progress(job)
            if job.status.finished:
                return job
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


def _api_error(answer: _Answer) -> ApiError:
    """The exception for a problem answer (or any unexpected one)."""
    data: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        parsed = json.loads(answer.body)
        if isinstance(parsed, dict):
            data = parsed
    errors = [
        (str(item.get("field", "")), str(item.get("message", "")))
        for item in data.get("errors") or []
        if isinstance(item, dict)
    ]
    detail = data.get("detail")
    if detail is None and not data:
        text = answer.body.decode("utf-8", "replace").strip()
        detail = text[:200] or None
    cls = ApiError
    if answer.status == 404:
        cls = NotFoundError
    elif answer.status in INVALID_REQUEST_STATUSES:
        cls = InvalidRequestError
    return cls(
        answer.status,
        str(data.get("title") or f"HTTP {answer.status}"),
        str(detail) if detail is not None else None,
        code=data.get("code"),
        errors=errors,
        request_id=data.get("requestId") or answer.headers.get("X-Request-ID"),
        type=str(data.get("type", "about:blank")),
    )


# --- the synchronous wrapper -----------------------------------------------------------


class SyncClient:
    """Blocking twin of :class:`LongdlClient` for scripts and notebooks.

    It runs a private event loop in a daemon thread, so it works whether or not the
    caller has a loop of its own, and keeps one connection pool across calls. Callbacks
    run on that thread. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, base_url: str, api_key: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="longdl client loop", daemon=True
        )
        self._thread.start()
        try:
            self._client = LongdlClient(base_url, api_key, **options)
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C in the caller's thread: stop the work in ours too.
            future.cancel()
            raise

    def initiate(self, file_ids: Sequence[int], **options: Any) -> Initiated:
        """See :meth:`LongdlClient.initiate`."""
        return self._call(self._client.initiate(file_ids, **options))

    def status(self, job_id: str) -> models.JobOut:
        """See :meth:`LongdlClient.status`."""
        return self._call(self._client.status(job_id))

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        on_progress: JobCallback | None = None,
    ) -> models.JobOut:
        """See :meth:`LongdlClient.wait`."""
        return self._call(self._client.wait(job_id, timeout_s=timeout_s, on_progress=on_progress))

    def download(self, job_id: str, path: str | os.PathLike[str], **options: Any) -> Path:
        """See :meth:`LongdlClient.download`."""
        return self._call(self._client.download(job_id, path, **options))

    def cancel(self, job_id: str) -> models.JobOut:
        """See :meth:`LongdlClient.cancel`."""
        return self._call(self._client.cancel(job_id))

    def history(self, **options: Any) -> HistoryPage:
        """See :meth:`LongdlClient.history`."""
        return self._call(self._client.history(**options))

    def result_link(self, job_id: str) -> models.ResultLinkOut | None:
        """See :meth:`LongdlClient.result_link`."""
        return self._call(self._client.result_link(job_id))

    def close(self) -> None:
        """Close the connections and stop the loop thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
