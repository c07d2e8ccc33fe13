"""``GET /v1/download/{jobId}/events``: live job state as Server-Sent Events.

The stream, in order:

- ``retry: 1000`` so browsers reconnect a second after the stream ends;
- ``event: snapshot``: the full job resource (the body of ``GET /v1/download/status/{id}``);
- ``event: progress`` when the job changed but kept its status, ``event: status`` when its
  status changed; every event's ``data`` is the full job resource, so a client keeps only
  the last one (state is a snapshot stream: a missed intermediate event loses nothing);
- ``: ping`` comments whenever the stream was quiet for ``SSE_HEARTBEAT_S`` (at most 15 s),
  so proxies do not drop it as idle;
- the terminal event: the ``status`` event (or the ``snapshot``, if the job had already
  finished) whose job has a finished status (``completed``, ``failed``, ``canceled``,
  ``expired``). The server closes the stream right after it; a client closes its
  ``EventSource`` when it sees a finished status, or the browser would reconnect.

No stream lives longer than ``SSE_MAX_S`` (default 50 s, under every proxy's limit): the
server ends it and the client reconnects with ``Last-Event-ID``.

Event ids are the job's ``updated_at`` in integer microseconds, bumped by one when needed
so they strictly increase within a stream. ``updated_at`` is stored in SQLite, so ids keep
increasing across reconnects and service restarts. On reconnect, the ``Last-Event-ID``
header (or ``?lastEventId=`` for clients that cannot set headers) is compared with the
current state's id: when it is at least as large the client already holds this state and
the snapshot is skipped; otherwise the current snapshot is sent. A finished job always
gets its snapshot, so a client that reconnects after the end still learns the outcome.

Wake-ups come from the engine's change hub, never from a polling loop; running jobs are
read from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from aiohttp import hdrs, web

from longdl import exceptions
from longdl.models import Job, JobStatus
from longdl.resource import View
from longdl.web import keys, problems, render
from longdl.web import routes as api
from longdl.web.openapi import JOB_ID, Param, Resp, doc
from longdl.web.openapi import problem as problems_doc

#: Reconnection delay the stream asks clients for.
RECONNECT_MS = 1000

#: What an event id looks like; Last-Event-ID values outside it are refused (400).
EVENT_ID_PATTERN = "^[0-9]{1,19}$"
MAX_EVENT_ID = 10**19 - 1
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
EVENT_ID_SCHEMA = {"type": "string", "pattern": EVENT_ID_PATTERN}
#: Last-Event-ID as a client sends it: an id, or empty for none (as EventSource resets it).
LAST_EVENT_ID_SCHEMA = {"type": "string", "pattern": "^([0-9]{1,19})?$"}

#: One event of the stream, as OpenAPI 3.1 describes the items of text/event-stream
#: (comments and the ``retry:`` line carry no data and are not events).
EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "id", "data"],
    "properties": {
        "event": {"enum": ["snapshot", "progress", "status"]},
        "id": EVENT_ID_SCHEMA,
        "data": {
            "type": "string",
            "description": "The job resource, as GET /v1/download/status/{job_id} answers it",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/JobOut"},
        },
        "retry": {"type": "integer", "minimum": 0},
    },
}

#: The head of every stream (and of the answer to a HEAD request).
_STREAM_HEADERS = {
    hdrs.CONTENT_TYPE: "text/event-stream",
    hdrs.CACHE_CONTROL: "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}

routes = web.RouteTableDef()


def setup(app: web.Application) -> None:
    """Add the events route. At shutdown the engine's drain wakes every stream and
    ``engine.stopping`` ends it, so open streams never hold the shutdown up."""
    app.router.add_routes(routes)


def event_id(job: Job) -> int:
    """The id of the job's current state: ``updated_at`` in integer microseconds."""
    return int(job.updated_at * 1_000_000)


def last_event_id(request: web.Request) -> int | None:
    """The id the client last saw (header first, then ``?lastEventId=``), or None.

    Raises:
        HTTPProblem: the id is not one this service hands out.
    """
    # No strip: HTTP already trims header values, and a query value is taken as sent.
    # The URL's query, not request.query, which would grow the request's cache of
    # properties (208 bytes per held stream).
    header = request.headers.get("Last-Event-ID") or ""
    query = request.rel_url.query.get("lastEventId") or ""
    # Both are checked, though the header wins: a malformed one is refused either way.
    for raw in (header, query):
        if raw and not _EVENT_ID.match(raw):
            raise problems.invalid_request("Last-Event-ID must be an event id this stream sent")
    raw = header or query
    return int(raw) if raw else None


def frame(event: str, event_id: int, data: bytes) -> bytes:
    """One SSE message; ``data`` is compact JSON, so it holds no line breaks."""
    return b"event: %s\nid: %d\ndata: %s\n\n" % (event.encode(), event_id, data)


class _Stream:
    """Writes one client's events, keeping ids strictly increasing."""

    def __init__(self, request: web.Request, response: web.StreamResponse, last_id: int) -> None:
        self.request = request
        self.response = response
        self.last_id = last_id

    async def send(self, event: str, job: Job, job_view: View) -> None:
        # Capped: a client that resumed from the largest id the pattern allows must not
        # be sent one it would be refused for resuming from.
        self.last_id = min(max(self.last_id + 1, event_id(job)), MAX_EVENT_ID)
        out = await render.job_body(self.request, job, job_view)
        await self.response.write(frame(event, self.last_id, render.dumps(out)))

    async def ping(self) -> None:
        await self.response.write(b": ping\n\n")


@routes.get("/v1/download/{job_id}/events")
@doc(
    "Live job state as Server-Sent Events",
    tag="downloads",
    description=(
        "A snapshot event first, then progress / status events (each carrying the job "
        "resource) with increasing ids; heartbeats while idle; the stream ends after the "
        "finished status, or after SSE_MAX_S (reconnect with Last-Event-ID)."
    ),
    params=[
        JOB_ID,
        Param(
            "Last-Event-ID",
            "header",
            "Resume: the id of the last event received",
            LAST_EVENT_ID_SCHEMA,
        ),
        Param(
            "lastEventId",
            "query",
            "Resume, for clients that cannot set headers",
            LAST_EVENT_ID_SCHEMA,
        ),
    ],
    responses={
        200: Resp("The event stream", media="text/event-stream", schema=EVENT_SCHEMA),
        400: problems_doc("A Last-Event-ID this stream never sent"),
        404: problems_doc("No such job, or not the caller's"),
    },
)
async def job_events(request: web.Request) -> web.StreamResponse:
    """Stream the job's state until it finishes, the lifetime cap, or the client leaves."""
    app = request.app
    engine = app[keys.ENGINE]
    settings = app[keys.SETTINGS]
    loop = asyncio.get_running_loop()
    ends_at = loop.time() + settings.sse_max_s
    seen_id = last_event_id(request)
    job_id = request.match_info["job_id"]
    # Watch before reading, so a change in between is not missed.
    watch = engine.hub.watch(job_id)
    try:
        job = await api.visible_job(request)
        if request.method == hdrs.METH_HEAD:
            # The head alone: events after it would be read as the next response on
            # the connection.
            return web.Response(headers=_STREAM_HEADERS)
        response = web.StreamResponse(headers=_STREAM_HEADERS)
        stream = _Stream(request, response, seen_id or 0)
        # try/except, not contextlib.suppress: a held stream keeps no suppress object.
        try:
            # The client may be gone before the head is sent, or at any write after.
            await response.prepare(request)
            # Sent, and read by nothing again; a held stream would keep them (~3 KiB each).
            response.headers.clear()
            await response.write(f"retry: {RECONNECT_MS}\n\n".encode())
            job_view = render.view(request, job)
            if job.status.finished or seen_id is None or seen_id < event_id(job):
                await stream.send("snapshot", job, job_view)
            # While it waits, a stream keeps what it compares, not the job (memory per
            # stream).
            last_status: JobStatus = job.status
            last_tag = job_view.etag
            finished = job.status.finished
            del job, job_view
            while not finished:
                remaining_s = ends_at - loop.time()
                if remaining_s <= 0 or engine.stopping:
                    break
                if not await watch.wait(min(settings.sse_heartbeat_s, remaining_s)):
                    if loop.time() < ends_at:
                        await stream.ping()
                    continue
                watch.renew()
                try:
                    job, job_view = await api.visible_view(request)
                except exceptions.JobNotFound:
                    break  # purged while we watched: nothing more will happen
                if job_view.etag == last_tag:
                    continue  # woken, but nothing a client sees changed
                event = "status" if job.status is not last_status else "progress"
                await stream.send(event, job, job_view)
                last_status, last_tag, finished = job.status, job_view.etag, job.status.finished
                del job, job_view
        except ConnectionError:
            pass
    finally:
        watch.close()
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response
