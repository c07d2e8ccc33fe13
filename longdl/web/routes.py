"""The v1 download routes and the service routes (/, /health)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from yarl import URL

import longdl
from longdl import exceptions, resource, webhooks
from longdl.handlers.download import source_key
from longdl.models import (
    CheckOut,
    CheckRequest,
    HealthOut,
    HistoryOut,
    HistoryQuery,
    InitiateOut,
    InitiateRequest,
    Job,
    JobOut,
    JobStatus,
    Priority,
    ResultLinkOut,
    RootOut,
    StartAcceptedOut,
    StartOut,
    StartRequest,
    utc_iso,
)
from longdl.web import keys, policy, render
from longdl.web.openapi import JOB_ID, UUID_PATTERN, Param, Resp, doc, problem
from longdl.web.problems import HTTPProblem, dumps, invalid_request, read_json, single_header

if TYPE_CHECKING:
    from longdl.engine import Engine

log = logging.getLogger("longdl.web")

HEALTH_CHECK_TIMEOUT_S = 2.0

routes = web.RouteTableDef()

#: Errors of every route that reads a JSON body.
BODY_ERRORS: Mapping[int, Resp] = {
    400: problem("Invalid JSON or a field out of its range; errors[] names the fields"),
    413: problem("The body is larger than MAX_BODY_BYTES"),
    415: problem(
        "The body is not JSON, or its Content-Encoding is not one decoded here",
        "Accept-Encoding",
    ),
}
#: Errors of routes that create jobs.
SUBMIT_ERRORS: Mapping[int, Resp] = {
    **BODY_ERRORS,
    400: problem(
        "Invalid JSON or a field out of its range (errors[] names the fields), or more"
        " than one Idempotency-Key"
    ),
    422: problem("This Idempotency-Key was used with a different request"),
    429: problem("Rate limited, or MAX_ACTIVE_PER_USER unfinished jobs", "Retry-After"),
    503: problem("MAX_QUEUED jobs are waiting, or the service is shutting down", "Retry-After"),
}
#: Where a queued job's id leads (OpenAPI links, so clients and fuzzers can follow them).
JOB_LINKS: Mapping[str, tuple[str, Mapping[str, str]]] = {
    name: (target, {"job_id": "$response.body#/jobId"})
    for name, target in (
        ("status", "get_v1_download_status_job_id"),
        ("result", "get_v1_download_job_id"),
        ("events", "get_v1_download_job_id_events"),
        ("cancel", "post_v1_download_cancel_job_id"),
        ("delete", "delete_v1_download_job_id"),
    )
}
#: The answers of a route that queues a job with submit_job and answers accepted():
#: applications' own job routes document themselves with these.
ACCEPTED: Mapping[int, Resp] = {
    202: Resp(
        "Queued (or replayed): poll statusUrl",
        InitiateOut,
        headers=("Location", "Retry-After", "Idempotent-Replayed"),
        links=JOB_LINKS,
    ),
    **SUBMIT_ERRORS,
}
NOT_FOUND = problem("No such job, or not the caller's")
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    "Replays the same job for the same request within 24 h (scoped to the caller); printable ASCII",
    {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[ -~]*$"},
)
#: The job id of ``/v1/download/{job_id}``: any segment but the names of the routes beside
#: it, so ``GET /v1/download/initiate`` is a wrong method on initiate (405 with Allow), not
#: a job named "initiate" (404); other ids still reach the route ("No such job").
JOB = "{job_id:(?!(?:check|history|initiate|start)$)[^{}/]+}"
PREFER = Param(
    "Prefer", "header", "respond-async, or wait=N: wait up to N s (SYNC_WAIT_MAX_S at most)"
)


@dataclass(frozen=True)
class Preferences:
    """What a ``Prefer`` header (RFC 7240) asks of us."""

    respond_async: bool = False
    wait_s: float | None = None


def parse_prefer(values: list[str]) -> Preferences:
    """Read ``respond-async`` and ``wait=N``; unknown or malformed preferences are ignored,
    as RFC 7240 says they must be."""
    respond_async = False
    wait_s: float | None = None
    for value in values:
        for preference in value.split(","):
            token, _, raw = preference.split(";")[0].partition("=")
            name = token.strip().lower()
            if name == "respond-async":
                respond_async = True
            elif name == "wait":
                seconds = _seconds(raw.strip().strip('"'))
                if seconds is not None and math.isfinite(seconds):
                    wait_s = seconds
    return Preferences(respond_async, wait_s)


def caller_of(request: web.Request) -> str:
    """The owner scope of the caller's jobs ("" when the service is open)."""
    return str(request.get(keys.CALLER, ""))


json_response = render.json_response


async def visible_job(request: web.Request) -> Job:
    """The job named in the URL, if the caller may see it; 404 otherwise."""
    job_id = request.match_info["job_id"]
    try:
        uuid.UUID(job_id)
    except ValueError as exc:
        raise exceptions.JobNotFound(job_id) from exc
    job = await request.app[keys.ENGINE].get(job_id)
    if job is None or job.owner != caller_of(request):
        raise exceptions.JobNotFound(job_id)
    return job


# --- service ---------------------------------------------------------------------------


@routes.get("/")
@doc(
    "Service name, version and links",
    tag="service",
    v1=False,
    responses={200: Resp("The service", RootOut)},
)
async def root(request: web.Request) -> web.Response:
    return json_response(
        RootOut(
            name="longdl",
            version=longdl.__version__,
            links={
                "docs": "/docs",
                "ui": "/ui",
                "openapi": "/openapi.json",
                "health": "/health",
            },
        )
    )


async def _probe(check: object) -> str:
    try:
        async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_S):
            await check  # type: ignore[misc]
    except Exception as exc:
        log.warning("health check failed: %r", exc)
        return "error"
    return "ok"


class HealthChecks:
    """The storage and database checks behind /health, run once for all the requests
    that arrive while they run: a load balancer (or anyone) asking hard costs one
    storage request and one database transaction per round of checks, not per request.
    A request joins the round running when it arrives, else starts one: every answer
    comes from checks that ended after its request arrived."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._running: asyncio.Task[dict[str, str]] | None = None

    async def run(self) -> dict[str, str]:
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._check(), name="longdl health checks")
        # Shielded: a caller that goes away does not cancel the others' checks.
        return await asyncio.shield(self._running)

    async def close(self, _: web.Application) -> None:
        """At shutdown, before the store and storage close: let the round running finish
        (HEALTH_CHECK_TIMEOUT_S at most), so no check is left behind them."""
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)

    async def _check(self) -> dict[str, str]:
        storage_state, database_state = await asyncio.gather(
            _probe(self._app[keys.STORAGE].check()), _probe(self._app[keys.STORE].ping())
        )
        return {"storage": storage_state, "database": database_state}


HEALTH_CHECKS = web.AppKey("health_checks", HealthChecks)


def install(app: web.Application) -> None:
    app[HEALTH_CHECKS] = checks = HealthChecks(app)
    app.on_shutdown.append(checks.close)
    app.router.add_routes(routes)


@routes.get("/health")
@doc(
    "Storage and database health",
    tag="service",
    v1=False,
    responses={
        200: Resp("Healthy", HealthOut),
        503: Resp("A check failed; it says error", HealthOut),
    },
)
async def health(request: web.Request) -> web.Response:
    checks = await request.app[HEALTH_CHECKS].run()
    healthy = all(v == "ok" for v in checks.values())
    body = HealthOut(status="healthy" if healthy else "unhealthy", checks=checks)  # type: ignore[arg-type]
    return json_response(body, 200 if healthy else 503, {hdrs.CACHE_CONTROL: "no-store"})


# --- v1 --------------------------------------------------------------------------------


@routes.post("/v1/download/check")
@doc(
    "Whether a source file exists, and its size",
    tag="downloads",
    body=CheckRequest,
    responses={200: Resp("Availability", CheckOut), **BODY_ERRORS},
)
async def check(request: web.Request) -> web.Response:
    body = CheckRequest.model_validate_json(await read_json(request))
    key = source_key(body.file_id)
    info = await request.app[keys.STORAGE].head(key)
    return json_response(
        CheckOut(
            file_id=body.file_id,
            available=info is not None,
            s3Key=key if info is not None else None,
            size=info.size_bytes if info is not None else None,
        )
    )


def _printable_ascii(value: str) -> bool:
    """Whether a header value is visible ASCII and spaces (bytes that are not UTF-8
    arrive as lone surrogates, which the database cannot store)."""
    return all(" " <= c <= "~" for c in value)


def request_hash(body: InitiateRequest) -> str:
    """Identity of a request for idempotency: what would change the job."""
    canonical = dumps(
        {
            "file_ids": body.unique_file_ids(),
            "priority": body.priority,
            "strict": body.strict,
            "userId": body.userId,
            "callbackUrl": str(body.callbackUrl) if body.callbackUrl else None,
        }
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def submit_job(
    request: web.Request,
    kind: str,
    payload: dict[str, Any],
    *,
    client_request_id: str | None = None,
    request_hash: str | Callable[[], str] = "",
    priority: Priority = Priority.NORMAL,
    user_id: str | None = None,
    callback_url: str | None = None,
) -> tuple[Job, bool]:
    """Queue a job of any registered kind for the caller, as initiate does.

    The caller's scope, limits, idempotency (``Idempotency-Key`` header, else
    ``client_request_id``) and webhook rules apply. Returns the job and whether an
    idempotency key replayed it. Applications adding their own job kinds call this from
    their route and answer with :func:`accepted`.

    Args:
        request_hash: what identifies the request for idempotency (same key with a
            different hash is a 422); hash the validated body. A callable is called
            only when a key is in play (hashing is 3 % of an initiate otherwise).
    """
    await webhooks.check_target(callback_url, request.app[keys.SETTINGS])
    header_key = single_header(request, "Idempotency-Key")
    if header_key is not None and not _printable_ascii(header_key):
        raise invalid_request("Idempotency-Key must be printable ASCII (a UUID, say)")
    idempotency_key = header_key if header_key is not None else client_request_id
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
        raise invalid_request("Idempotency-Key must be 1 to 200 characters")
    if callable(request_hash):
        request_hash = request_hash() if idempotency_key is not None else ""
    inserted = await request.app[keys.ENGINE].submit(
        kind,
        payload,
        owner=caller_of(request),
        client=request[keys.CLIENT],
        priority=priority,
        user_id=user_id,
        client_request_id=client_request_id,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    job = inserted.job
    if not inserted.replayed and job.status is JobStatus.RUNNING:
        # Claimed by its own insert (a slot was free), it is already running; the answer
        # to the request that queued it says queued, as the contract has it. The first
        # poll says running.
        job = dataclasses.replace(job, status=JobStatus.QUEUED)
    return job, inserted.replayed


async def submit_download(request: web.Request, body: InitiateRequest) -> tuple[Job, bool]:
    """Queue a download job for the caller; returns the job and whether it was replayed."""
    return await submit_job(
        request,
        "download",
        {"file_ids": body.unique_file_ids(), "strict": body.strict},
        client_request_id=body.clientRequestId,
        request_hash=lambda: request_hash(body),
        priority=Priority.from_name(body.priority),
        user_id=body.userId,
        callback_url=str(body.callbackUrl) if body.callbackUrl else None,
    )


def accepted(job: Job, replayed: bool = False) -> web.Response:
    """The 202 initiate answers: the job's URLs, Location and Retry-After."""
    out = resource.initiate_dict(job)
    return json_response(out, 202, accepted_headers(out, replayed))


def accepted_headers(out: Mapping[str, Any], replayed: bool) -> dict[str, str]:
    headers: dict[str, str] = {
        hdrs.LOCATION: out["statusUrl"],
        hdrs.RETRY_AFTER: render.retry_after_s(out["nextPollInMs"]),
        hdrs.VARY: "Prefer",
    }
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return headers


async def wait_if_preferred(
    request: web.Request, job: Job, wait_s: float, prefs: Preferences
) -> tuple[Job, dict[str, str]]:
    """Wait up to ``wait_s`` (capped by SYNC_WAIT_MAX_S) for the job to finish.

    Returns the job as it is then, and the Preference-Applied header to send.
    """
    if prefs.respond_async:
        return job, {"Preference-Applied": "respond-async"}
    wait_s = min(wait_s, request.app[keys.SETTINGS].sync_wait_max_s)
    if wait_s > 0 and not job.status.finished:
        job = await request.app[keys.ENGINE].wait_finished(job.id, wait_s) or job
    applied = {"Preference-Applied": f"wait={wait_s:g}"} if prefs.wait_s is not None else {}
    return job, applied


@routes.post("/v1/download/initiate")
@doc(
    "Start a download job; answers at once",
    tag="downloads",
    body=InitiateRequest,
    params=[IDEMPOTENCY_KEY, PREFER],
    responses={
        202: Resp(
            "Queued (or replayed): poll statusUrl",
            InitiateOut,
            headers=("Location", "Retry-After", "Idempotent-Replayed", "Preference-Applied"),
            links=JOB_LINKS,
        ),
        200: Resp(
            "Prefer: wait=N and the job finished in time", JobOut, headers=("Preference-Applied",)
        ),
        **SUBMIT_ERRORS,
    },
)
async def initiate(request: web.Request) -> web.Response:
    body = InitiateRequest.model_validate_json(await read_json(request))
    prefs = parse_prefer(request.headers.getall("Prefer", []))
    job, replayed = await submit_download(request, body)
    job, applied = await wait_if_preferred(request, job, prefs.wait_s or 0.0, prefs)
    if prefs.wait_s is not None and not prefs.respond_async and job.status.finished:
        response = await job_response(request, job)
        response.headers.update({hdrs.VARY: "Prefer", **applied})
        return response
    response = accepted(job, replayed)
    response.headers.update(applied)
    return response


@routes.post("/v1/download/start")
@doc(
    "The original synchronous download, safe behind proxies",
    tag="downloads",
    description=(
        "Local callers (loopback or an Origin in SYNC_ORIGINS, and no forwarding header) "
        "wait and get the original shape; everyone else gets 202 and a URL to poll."
    ),
    body=StartRequest,
    params=[IDEMPOTENCY_KEY, PREFER],
    responses={
        200: Resp("Finished (original shape)", StartOut, headers=("Preference-Applied",)),
        202: Resp(
            "Still running, or a remote caller: poll pollingEndpoint",
            StartAcceptedOut,
            headers=("Location", "Retry-After", "Preference-Applied"),
            links=JOB_LINKS,
        ),
        **SUBMIT_ERRORS,
    },
)
async def start(request: web.Request) -> web.Response:
    """The original synchronous endpoint, made safe behind proxies (DESIGN.md §3).

    Local callers wait (up to SYNC_WAIT_MAX_S) and get the original answer; everyone
    else gets 202 and a URL to poll, unless they ask to wait with ``Prefer: wait=N``.
    """
    body = StartRequest.model_validate_json(await read_json(request))
    origin = _origin(request)
    settings = request.app[keys.SETTINGS]
    prefs = parse_prefer(request.headers.getall("Prefer", []))
    local = policy.is_local_caller(request, settings.sync_origins)
    job, replayed = await submit_download(request, InitiateRequest(file_id=body.file_id))
    wait_s = (
        prefs.wait_s if prefs.wait_s is not None else (settings.sync_wait_max_s if local else 0)
    )
    job, applied = await wait_if_preferred(request, job, wait_s, prefs)
    headers = {hdrs.VARY: "Prefer", **applied}
    if job.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED):
        return json_response(await start_out(request, origin, body.file_id, job), headers=headers)
    initiated = resource.initiate_dict(job)
    out = {
        **initiated,
        "file_id": body.file_id,
        "pollingEndpoint": initiated["statusUrl"],
        "message": "Preparing the download; poll pollingEndpoint until it is completed",
    }
    return json_response(out, 202, {**accepted_headers(out, replayed), **headers})


def _origin(request: web.Request) -> URL:
    """The origin the client addressed (its Host, or an absolute request target), which
    the original shape's download URL is made absolute against.

    Raises:
        HTTPProblem: 400, it is not a valid host (checked before any job is started).
    """
    try:
        return request.url.origin()
    except ValueError as exc:  # UnicodeError too: a host the IDNA codec refuses
        raise HTTPProblem(400, "The Host header is not a valid host") from exc


async def start_out(request: web.Request, origin: URL, file_id: int, job: Job) -> StartOut:
    """A finished job in the original service's shape, with a download URL made absolute
    against ``origin``."""
    signed = await render.sign_result(request, job)
    finished_at = job.finished_at or job.updated_at
    processing_ms = int(max(0.0, finished_at - job.created_at) * 1000)
    if signed is None or job.result is None:
        error = job.error or {}
        return StartOut(
            file_id=file_id,
            status="failed",
            downloadUrl=None,
            size=None,
            processingTimeMs=processing_ms,
            message=str(error.get("message", f"The download {job.status.value}")),
        )
    url = signed.url
    if url.startswith("/"):
        url = str(origin.join(URL(url, encoded=True)))
    return StartOut(
        file_id=file_id,
        status="completed",
        downloadUrl=url,
        size=job.result["size_bytes"],
        processingTimeMs=processing_ms,
        message="Download ready",
    )


def _wait_s(request: web.Request) -> float:
    # The URL's query, not request.query: each property a request caches takes a slot of
    # its cache, and the one past aiohttp's own four and our remote grows it (208 bytes
    # per held long-poll).
    url = request.rel_url
    if not url.raw_query_string:
        return 0.0  # most polls: no need to parse a query
    raw = url.query.get("wait")
    if raw is None:
        return 0.0
    wait_s = _seconds(raw)
    if wait_s is None:
        raise invalid_request("wait must be a number of seconds")
    return min(wait_s, request.app[keys.SETTINGS].long_poll_max_s)


def _seconds(text: str) -> float | None:
    """A number of seconds, 0 or more, written in ASCII; None for anything else (float()
    alone also takes other scripts' digits and underscores)."""
    if not text.isascii() or "_" in text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


poll_headers = render.poll_headers


async def job_response(request: web.Request, job: Job, status: int = 200) -> web.Response:
    """The job resource with its validator and poll hints."""
    job_view = render.view(request, job)
    return _job_answer(job, job_view, await render.job_bytes(request, job, job_view), status)


def _job_answer(job: Job, job_view: resource.View, data: bytes, status: int = 200) -> web.Response:
    """The job's encoding ``data`` with its validator and poll hints."""
    return web.Response(
        status=status,
        body=data,
        content_type=render.JSON,
        headers=poll_headers(job, job_view.etag),
    )


@routes.get("/v1/download/status/{job_id}")
@doc(
    "The job, with progress; long-poll with ?wait=",
    tag="downloads",
    params=[
        JOB_ID,
        Param(
            "wait",
            "query",
            "Long-poll: answer when the job changes, at most LONG_POLL_MAX_S",
            {"type": "number", "minimum": 0},
        ),
        Param("If-None-Match", "header", "ETag of the last answer: 304 when unchanged"),
    ],
    responses={
        200: Resp("The job", JobOut, headers=("ETag", "Retry-After")),
        304: Resp("Unchanged since If-None-Match", headers=("ETag", "Retry-After")),
        400: problem("A bad wait"),
        404: NOT_FOUND,
    },
)
async def status(request: web.Request) -> web.StreamResponse:
    engine = request.app[keys.ENGINE]
    wait_s = _wait_s(request)
    job_id = request.match_info["job_id"]
    live = _live_view(request, engine, job_id) if not wait_s else None
    if live is not None and not live[0].status.finished:
        # Most polls: a job running here (no URL to sign), answered without an await.
        job, job_view = live
        return _status_answer(request, job, job_view, resource.encoded(job_view, job))
    # A long-poll watches before reading, so a change in between counts.
    watch = engine.hub.watch(job_id) if wait_s > 0 else None
    try:
        job, job_view = await visible_view(request)
        client_tag = request.headers.get(hdrs.IF_NONE_MATCH)
        if (
            watch is not None
            and not job.status.finished
            and not engine.stopping
            and (client_tag is None or none_match(client_tag, job_view.etag))
        ):
            # Wait up to wait_s until the job differs from what the client holds, then
            # read it. A wake-up that changed nothing the client sees (a notification of
            # a change it already has, a progress report that rounds to the same) waits
            # on, so a long-poll answers a change or its time limit, never a spurious
            # wake-up. Waited here, not in a function of its own, and keeping the tag it
            # compares, not the job: 10,000 held long-polls hold 10,000 frames and tags.
            tag = job_view.etag
            del job, job_view
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            while await watch.wait(deadline - loop.time()) and not engine.stopping:
                watch.renew()
                job, job_view = await visible_view(request)
                if job_view.etag != tag or job.status.finished:
                    break
                del job, job_view
            else:
                job, job_view = await visible_view(request)
    finally:
        if watch is not None:
            watch.close()
    return _status_answer(request, job, job_view, await render.job_bytes(request, job, job_view))


def _status_answer(
    request: web.Request, job: Job, job_view: resource.View, data: bytes
) -> web.Response:
    """The job's encoding ``data`` with its validator and poll hints, or 304 when the
    client's If-None-Match names its ETag."""
    tag = job_view.etag
    client_tag = request.headers.get(hdrs.IF_NONE_MATCH)
    if client_tag is not None and none_match(client_tag, tag):
        return web.Response(status=304, headers=poll_headers(job, tag))
    return _job_answer(job, job_view, data)


def none_match(header: str, tag: str) -> bool:
    """Whether an If-None-Match ``header`` names ``tag`` (RFC 9110, 13.1.2): ``*``, or
    one of its tags under the weak comparison, which ignores ``W/``."""
    if header == tag:
        return True  # what a polling client sends back
    opaque = tag.removeprefix("W/")
    return any(
        t == "*" or t.removeprefix("W/") == opaque for t in (t.strip() for t in header.split(","))
    )


def _live_view(
    request: web.Request, engine: Engine, job_id: str
) -> tuple[Job, resource.View] | None:
    """The caller's job running here, read in place (no copy, no query), and its
    rendering, kept per version of it; None for any other job. A running job has no
    signed URL to add, so answering it needs no await."""
    live = engine.live(job_id)
    if live is None:
        return None
    job, version = live
    if job.owner != caller_of(request):
        return None
    return job, render.view(request, job, version)


async def visible_view(request: web.Request) -> tuple[Job, resource.View]:
    """The job named in the URL and its rendering; a job running here is read in place."""
    live = _live_view(request, request.app[keys.ENGINE], request.match_info["job_id"])
    if live is not None:
        return live
    job = await visible_job(request)
    return job, render.view(request, job)


#: A history cursor: the last job's creation time (``repr`` of the float, so it reads back
#: exactly) and id. Clients treat it as opaque; the pattern lets the spec say which strings
#: are cursors, and every string it matches is a position the server accepts.
CURSOR_PATTERN = r"^[0-9]{1,11}(\.[0-9]{1,17})?_" + UUID_PATTERN.removeprefix("^")
#: The cursor parameter: a cursor, or empty for the first page.
CURSOR_PARAM_PATTERN = f"^$|{CURSOR_PATTERN}"
_CURSOR = re.compile(CURSOR_PATTERN)
#: ``status`` of history: statuses, comma-separated (empty items ignored).
STATUS_LIST_PATTERN = "^(|{0})(,(|{0}))*$".format("|".join(s.value for s in JobStatus))


def encode_cursor(job: Job) -> str:
    """A cursor pointing just after ``job`` in newest-first order."""
    return f"{job.created_at!r}_{job.id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) a cursor points after; 400 for anything else."""
    if not _CURSOR.match(cursor):
        raise invalid_request("cursor is not one this service issued")
    created_at, _, job_id = cursor.partition("_")
    return float(created_at), job_id


def history_query(request: web.Request) -> HistoryQuery:
    """Parse the history query; ``status`` may be repeated or comma-separated."""
    query = request.query
    unknown = set(query) - set(HistoryQuery.model_fields)
    data: dict[str, object] = {k: v for k, v in query.items() if k != "status"}
    data["status"] = [s for value in query.getall("status", []) for s in value.split(",") if s]
    for name in unknown:
        data[name] = query[name]
    return HistoryQuery.model_validate(data)


@routes.get("/v1/download/history")
@doc(
    "The caller's jobs, newest first",
    tag="downloads",
    params=[
        Param(
            "userId",
            "query",
            "Only this user's jobs",
            {"type": "string", "minLength": 1, "maxLength": 200},
        ),
        Param(
            "status",
            "query",
            "Only these statuses; repeat or comma-separate",
            {"type": "string", "pattern": STATUS_LIST_PATTERN},
        ),
        Param("limit", "query", "Page size", {"type": "integer", "minimum": 1, "maximum": 100}),
        Param(
            "cursor",
            "query",
            "nextCursor of the previous page",
            {"type": "string", "pattern": CURSOR_PARAM_PATTERN},
        ),
    ],
    responses={
        200: Resp("A page of jobs", HistoryOut),
        400: problem("A bad parameter (unknown ones included)"),
    },
)
async def history(request: web.Request) -> web.Response:
    params = history_query(request)
    before = decode_cursor(params.cursor) if params.cursor else None
    jobs = await request.app[keys.STORE].list_jobs(
        owner=caller_of(request),
        client=request[keys.CLIENT],
        user_id=params.userId,
        statuses=params.status,
        limit=params.limit + 1,
        before=before,
    )
    page = jobs[: params.limit]
    engine = request.app[keys.ENGINE]
    # Rows of running jobs lag behind their in-memory progress; show the live state.
    live = [await engine.get(job.id) or job for job in page]
    next_cursor = encode_cursor(page[-1]) if len(jobs) > params.limit else None
    out = {
        "items": [await render.job_body(request, job) for job in live],
        "nextCursor": next_cursor,
    }
    return json_response(out, headers={hdrs.CACHE_CONTROL: "no-cache"})


@routes.get(f"/v1/download/{JOB}")
@doc(
    "The result: a redirect to a fresh signed URL once completed",
    tag="downloads",
    params=[
        JOB_ID,
        Param(
            "redirect",
            "query",
            "false: answer the URL as JSON instead of redirecting",
            {"type": "boolean"},
        ),
    ],
    responses={
        302: Resp("Completed: go to the signed URL", headers=("Location",)),
        200: Resp("Completed, with redirect=false", ResultLinkOut),
        202: Resp("Not finished yet: poll again", JobOut, headers=("Retry-After",)),
        404: NOT_FOUND,
        409: problem("Failed or canceled: the job's error"),
        410: problem("Expired: the result was deleted"),
    },
)
async def result(request: web.Request) -> web.StreamResponse:
    job = await visible_job(request)
    if job.status is JobStatus.COMPLETED:
        signed = await render.sign_result(request, job)
        assert signed is not None and job.result is not None
        if request.query.get("redirect", "true").lower() in ("false", "0", "no"):
            return json_response(
                ResultLinkOut(
                    url=signed.url,
                    expiresAt=utc_iso(signed.expires_at) or "",
                    filename=job.result["filename"],
                    size=job.result["size_bytes"],
                ),
                headers={hdrs.CACHE_CONTROL: "no-store"},
            )
        # encoded=True: a presigned URL must reach the client byte for byte, or its
        # signature may not match what S3 computes.
        raise web.HTTPFound(URL(signed.url, encoded=True), headers={hdrs.CACHE_CONTROL: "no-store"})
    if job.status is JobStatus.EXPIRED:
        raise HTTPProblem(410, "The job's result expired and was deleted", code="JOB_EXPIRED")
    if job.status.finished:
        error = job.error or {}
        raise HTTPProblem(
            409,
            error.get("message", f"The job is {job.status.value}"),
            title=f"Job {job.status.value}",
            code=error.get("code", job.status.value.upper()),
        )
    return await job_response(request, job, 202)


@routes.post("/v1/download/cancel/{job_id}")
@routes.delete(f"/v1/download/{JOB}")
@doc(
    "Cancel a queued or running job (POST .../cancel/{job_id} or DELETE .../{job_id})",
    tag="downloads",
    params=[JOB_ID],
    responses={
        200: Resp("Canceled", JobOut),
        404: NOT_FOUND,
        409: problem("Already finished"),
    },
)
async def cancel(request: web.Request) -> web.Response:
    job = await visible_job(request)
    canceled = await request.app[keys.ENGINE].cancel(job.id)
    return await job_response(request, canceled)
