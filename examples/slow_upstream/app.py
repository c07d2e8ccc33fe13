"""A job that waits on a slow upstream operation, as a longdl job kind.

Run it (it starts the demo upstream of ``upstream.py`` in the same process unless you name
a real one with ``--upstream``)::

    python examples/slow_upstream/app.py

then ``POST /v1/reports {"report": "sales", "rows": 5000}`` answers 202 with a job id at
once; the standard routes poll (``/v1/download/status/{id}``), cancel and fetch it.

The job (:meth:`ReportJobs.run`) asks the upstream to prepare a report, polls it as often
as its ``Retry-After`` says, mirrors its progress, then streams the result into storage.

- Transient upstream trouble (connection errors, timeouts, 408, 425, 429, 5xx) fails the
  attempt as retryable: longdl retries it with backoff. The operation is created with
  ``Idempotency-Key: longdl-{job_id}``, so the next attempt, or the job after a restart,
  finds the same operation instead of starting the slow work again.
- Any other 4xx fails the job at once (the request itself is wrong).
- Canceling the job, or its time limit, cancels the upstream operation (best effort);
  a shutdown does not, since the re-queued job resumes the operation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Literal

import aiohttp
import pydantic
from aiohttp import hdrs, web
from pydantic import BaseModel, ConfigDict, Field
from yarl import URL

from longdl import cli, exceptions
from longdl.app import create_app
from longdl.client import parse_retry_after
from longdl.config import Settings
from longdl.engine import Artifact, JobContext
from longdl.models import JobStatus
from longdl.storage import Storage
from longdl.web import openapi, problems, routes

log = logging.getLogger("longdl.examples.slow_upstream")

#: The job kind this example registers.
KIND = "report"
#: Share of the progress bar that mirrors the upstream's progress; the rest is the
#: download of the result into storage.
UPSTREAM_SHARE = 90.0
CHUNK_BYTES = 64 * 1024


class ReportRequest(BaseModel):
    """Body of ``POST /v1/reports``."""

    model_config = ConfigDict(extra="forbid")

    report: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", description="A report the upstream knows, e.g. sales"
    )
    rows: int = Field(default=1000, ge=1, le=1_000_000, description="Rows of the report")
    clientRequestId: str | None = Field(
        default=None, min_length=1, max_length=200, description="Idempotency key"
    )


class UpstreamOperation(BaseModel):
    """What the upstream says about an operation (fields we do not use are ignored)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    status: Literal["running", "done", "failed", "canceled"]
    progress: float = Field(default=0.0, ge=0, le=100)
    error: str | None = None


def is_transient(status: int) -> bool:
    """Whether an upstream answer is worth retrying later."""
    return status in (408, 425, 429) or status >= 500


def unavailable(exc: BaseException) -> exceptions.JobFailed:
    """A connection-level failure as a retryable job error (no internals for the client)."""
    return exceptions.JobFailed(
        "UPSTREAM_UNAVAILABLE",
        f"The upstream could not be reached ({type(exc).__name__})",
        retryable=True,
    )


async def check_answer(response: aiohttp.ClientResponse) -> None:
    """Raise the job error an upstream error answer calls for.

    Raises:
        exceptions.JobFailed: retryable for transient statuses, final for other 4xx.
    """
    if response.status < 400:
        return
    if is_transient(response.status):
        raise exceptions.JobFailed(
            "UPSTREAM_UNAVAILABLE", f"The upstream answered {response.status}", retryable=True
        )
    detail = ""
    try:
        body = await response.json(content_type=None)
        if isinstance(body, dict):
            detail = str(body.get("detail", ""))[:200]
    except (ValueError, aiohttp.ClientError):
        pass
    raise exceptions.JobFailed(
        "UPSTREAM_REJECTED",
        f"The upstream refused the request ({response.status}){': ' + detail if detail else ''}",
        retryable=False,
    )


class ReportJobs:
    """Report jobs against one upstream; one instance per longdl app.

    Args:
        upstream_url: base URL of the upstream API.
        min_poll_s: never poll more often than this, whatever Retry-After says.
        max_poll_s: never wait longer than this between polls (a Retry-After of days
            would otherwise stall the job until its time limit).
        request_timeout_s: connect and read timeout of each upstream request.
        cancel_timeout_s: how long canceling the upstream operation may take.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        min_poll_s: float = 0.5,
        max_poll_s: float = 300.0,
        request_timeout_s: float = 30.0,
        cancel_timeout_s: float = 5.0,
    ) -> None:
        self.upstream = URL(upstream_url)
        self.min_poll_s = min_poll_s
        self.max_poll_s = max_poll_s
        self.request_timeout_s = request_timeout_s
        self.cancel_timeout_s = cancel_timeout_s

    def poll_delay_s(self, retry_after: str | None) -> float:
        """How long to wait before the next poll: Retry-After, within our bounds."""
        asked_s = parse_retry_after(retry_after) or 0.0
        return min(self.max_poll_s, max(self.min_poll_s, asked_s))

    async def run(self, ctx: JobContext) -> Artifact:
        """The job: create (or find again) the operation, wait for it, store its result."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.request_timeout_s, sock_read=self.request_timeout_s
        )
        async with aiohttp.ClientSession(timeout=timeout) as session:
            ctx.report(message="Asking the upstream for the report")
            operation, retry_after = await self._call(
                session,
                "POST",
                self.upstream / "operations",
                json_body={"report": ctx.payload["report"], "rows": ctx.payload["rows"]},
                headers={"Idempotency-Key": f"longdl-{ctx.job_id}"},
            )
            try:
                await self._wait_done(session, ctx, operation, retry_after)
                return await self._store_result(session, ctx, operation.id)
            except asyncio.CancelledError:
                # A shutdown re-queues the job and the next attempt resumes this operation;
                # a cancel or the time limit ends it for good.
                if ctx.stop_reason != "shutdown":
                    await self._cancel_upstream(session, operation.id)
                raise

    async def _call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        *,
        json_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[UpstreamOperation, str | None]:
        """One call answering an operation; returns it and the Retry-After header."""
        try:
            async with session.request(method, url, json=json_body, headers=headers) as response:
                await check_answer(response)
                body = await response.read()
                retry_after = response.headers.get(hdrs.RETRY_AFTER)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unavailable(exc) from exc
        try:
            return UpstreamOperation.model_validate_json(body), retry_after
        except pydantic.ValidationError as exc:
            raise exceptions.JobFailed(
                "UPSTREAM_PROTOCOL", "The upstream answered something unexpected"
            ) from exc

    async def _wait_done(
        self,
        session: aiohttp.ClientSession,
        ctx: JobContext,
        operation: UpstreamOperation,
        retry_after: str | None,
    ) -> None:
        """Poll until the operation is done, mirroring its progress."""
        while operation.status != "done":
            if operation.status == "failed":
                message = operation.error or "The upstream could not prepare the report"
                raise exceptions.JobFailed("UPSTREAM_FAILED", message)
            if operation.status == "canceled":
                raise exceptions.JobFailed("UPSTREAM_FAILED", "The upstream operation was canceled")
            ctx.report(
                percent=UPSTREAM_SHARE * operation.progress / 100,
                message=f"The upstream is preparing the report: {operation.progress:.0f}%",
            )
            await asyncio.sleep(self.poll_delay_s(retry_after))
            operation, retry_after = await self._call(
                session, "GET", self.upstream / "operations" / operation.id
            )

    async def _store_result(
        self, session: aiohttp.ClientSession, ctx: JobContext, operation_id: str
    ) -> Artifact:
        """Stream the operation's result into ``reports/{job_id}.jsonl``."""
        await ctx.set_status(JobStatus.PROCESSING_ARTIFACTS)
        ctx.report(percent=UPSTREAM_SHARE, message="Fetching the report")
        digest = hashlib.sha256()
        url = self.upstream / "operations" / operation_id / "result"
        try:
            async with session.get(url) as response:
                await check_answer(response)
                total = response.content_length or 0
                content_type = response.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream")

                async def chunks() -> AsyncGenerator[bytes, None]:
                    done = 0
                    try:
                        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                            digest.update(chunk)
                            done += len(chunk)
                            share = done / total if total else 0.0
                            ctx.report(
                                percent=UPSTREAM_SHARE + (99 - UPSTREAM_SHARE) * share,
                                bytes_done=done,
                                bytes_total=total,
                            )
                            yield chunk
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        # Raised here, storage sees our error (and leaves nothing behind)
                        # rather than one it could mistake for its own.
                        raise unavailable(exc) from exc

                key = f"reports/{ctx.job_id}.jsonl"
                async with contextlib.aclosing(chunks()) as body:
                    info = await ctx.storage.write(key, body, content_type)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Storage left nothing behind; the next attempt fetches the result again.
            raise unavailable(exc) from exc
        return Artifact(
            key=info.key,
            filename=f"{ctx.payload['report']}.jsonl",
            size_bytes=info.size_bytes,
            sha256=digest.hexdigest(),
            content_type=content_type,
            details={"operation": operation_id},
        )

    async def _cancel_upstream(self, session: aiohttp.ClientSession, operation_id: str) -> None:
        """Ask the upstream to stop; never fails the cancellation itself."""
        try:
            async with asyncio.timeout(self.cancel_timeout_s):
                url = self.upstream / "operations" / operation_id
                async with session.delete(url) as response:
                    log.info("upstream operation %s canceled: %d", operation_id, response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not cancel upstream operation %s: %r", operation_id, exc)


REPORT_JOBS = web.AppKey("report_jobs", ReportJobs)


def request_hash(body: ReportRequest) -> str:
    """What identifies a report request for idempotency."""
    canonical = json.dumps({"report": body.report, "rows": body.rows}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@openapi.doc(
    "Prepare a report at the slow upstream; answers at once with a job",
    tag="reports",
    description=(
        "Poll statusUrl, then fetch resultUrl: the job is followed, canceled and downloaded "
        "through the standard /v1/download routes. A report the upstream does not know "
        "fails the job with UPSTREAM_REJECTED."
    ),
    body=ReportRequest,
    params=[routes.IDEMPOTENCY_KEY],
    responses=routes.ACCEPTED,
)
async def create_report(request: web.Request) -> web.Response:
    """``POST /v1/reports``: queue a report job."""
    body = ReportRequest.model_validate_json(await problems.read_json(request))
    job, replayed = await routes.submit_job(
        request,
        KIND,
        {"report": body.report, "rows": body.rows},
        client_request_id=body.clientRequestId,
        request_hash=request_hash(body),
    )
    return routes.accepted(job, replayed)


def build_app(
    jobs: ReportJobs, settings: Settings | None = None, *, storage: Storage | None = None
) -> web.Application:
    """A longdl service with the ``report`` job kind and ``POST /v1/reports``."""
    app = create_app(settings, handlers={KIND: jobs.run}, storage=storage)
    app[REPORT_JOBS] = jobs
    app.router.add_post("/v1/reports", create_report)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A longdl service whose jobs wait on a slow upstream API "
        "(settings from the environment, as longdl serve: PORT, DATA_DIR, ...)."
    )
    parser.add_argument("--upstream", help="the upstream's base URL (default: run the demo one)")
    parser.add_argument("--upstream-port", type=int, default=8081, help="port of the demo one")
    parser.add_argument("--upstream-seconds", type=float, default=20.0, help="its slowness")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings()
    upstream_url = args.upstream or f"http://127.0.0.1:{args.upstream_port}"
    app = build_app(ReportJobs(upstream_url), settings)
    if args.upstream is None:
        # Run as a script, this file's folder is on sys.path: the demo upstream is beside it.
        import upstream as demo

        async def demo_upstream(app: web.Application) -> AsyncIterator[None]:
            runner = web.AppRunner(demo.Upstream(duration_s=args.upstream_seconds).app())
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", args.upstream_port).start()
            log.info("demo upstream on %s", upstream_url)
            yield
            await runner.cleanup()

        # First in, last out: the upstream outlives the jobs that poll it.
        app.cleanup_ctx.insert(0, demo_upstream)
    cli.run(app, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
