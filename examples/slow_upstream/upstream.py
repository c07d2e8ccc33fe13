"""A small, slow upstream API for the slow_upstream example: reports that take N seconds.

Run it on its own (``app.py`` starts one for you unless given ``--upstream``)::

    python examples/slow_upstream/upstream.py --port 8081 --seconds 20

Its API, shaped like many long-running-operation APIs (cloud exports, render farms)::

    POST   /operations {"report": "sales", "rows": 1000}
           201 {"id", "report", "rows", "status": "running", "progress": 0} + Retry-After;
           with Idempotency-Key, the same key gets the same operation back (200)
    GET    /operations/{id}         the operation; Retry-After while it runs
    GET    /operations/{id}/result  the report as JSON lines once "done" (409 before)
    DELETE /operations/{id}         cancel it

Unknown reports are 404 and bad bodies 400: answers a client must not retry.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import hdrs, web

#: The reports this upstream knows how to prepare.
REPORTS = ("sales", "inventory", "customers")
MAX_ROWS = 1_000_000
CHUNK_BYTES = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Operation:
    """One report being prepared."""

    id: str
    report: str
    rows: int
    started_at: float
    duration_s: float
    canceled: bool = False
    #: When each status request for it arrived (the upstream's clock), for demos and tests.
    polled_at: list[float] = field(default_factory=list)


def result_lines(operation: Operation) -> Iterator[bytes]:
    """The finished report: one JSON object per line, the same every time it is asked for."""
    for row in range(1, operation.rows + 1):
        value = (row * 7919 + len(operation.report)) % 10007
        line = {"row": row, "report": operation.report, "value": value}
        yield json.dumps(line, separators=(",", ":")).encode() + b"\n"


class Upstream:
    """The upstream's state and its aiohttp application.

    Args:
        duration_s: how long each operation takes.
        retry_after_s: the Retry-After sent while an operation runs.
        clock: seconds, monotonic; injectable so a test can move time itself.
    """

    def __init__(
        self,
        *,
        duration_s: float = 20.0,
        retry_after_s: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.duration_s = duration_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.operations: dict[str, Operation] = {}
        self._by_key: dict[str, str] = {}
        #: Statuses the next requests get instead of their answer (e.g. 503), to show
        #: how the job copes with an upstream that fails now and then.
        self.faults: deque[int] = deque()

    def progress(self, operation: Operation) -> float:
        elapsed_s = self.clock() - operation.started_at
        return min(100.0, 100.0 * elapsed_s / operation.duration_s)

    def status(self, operation: Operation) -> str:
        if operation.canceled:
            return "canceled"
        return "done" if self.progress(operation) >= 100.0 else "running"

    def result_bytes(self, operation: Operation) -> bytes:
        return b"".join(result_lines(operation))

    def _describe(self, operation: Operation) -> web.Response:
        status = self.status(operation)
        body: dict[str, Any] = {
            "id": operation.id,
            "report": operation.report,
            "rows": operation.rows,
            "status": status,
            "progress": round(self.progress(operation), 1),
        }
        headers = {hdrs.RETRY_AFTER: str(self.retry_after_s)} if status == "running" else {}
        return web.json_response(body, headers=headers)

    def _find(self, request: web.Request) -> Operation:
        operation = self.operations.get(request.match_info["operation_id"])
        if operation is None:
            raise web.HTTPNotFound(
                text='{"detail":"no such operation"}', content_type="application/json"
            )
        return operation

    async def create(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if key is not None and key in self._by_key:
            return self._describe(self.operations[self._by_key[key]])
        try:
            body = await request.json()
            report, rows = body["report"], body.get("rows", 1000)
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"detail": "send {report, rows}"}, status=400)
        if not isinstance(rows, int) or not 1 <= rows <= MAX_ROWS:
            return web.json_response({"detail": f"rows must be 1..{MAX_ROWS}"}, status=400)
        if report not in REPORTS:
            return web.json_response({"detail": f"no such report: {report}"}, status=404)
        operation = Operation(uuid.uuid4().hex, report, rows, self.clock(), self.duration_s)
        self.operations[operation.id] = operation
        if key is not None:
            self._by_key[key] = operation.id
        response = self._describe(operation)
        response.set_status(201)
        response.headers[hdrs.LOCATION] = f"/operations/{operation.id}"
        return response

    async def get(self, request: web.Request) -> web.Response:
        operation = self._find(request)
        operation.polled_at.append(self.clock())
        return self._describe(operation)

    async def result(self, request: web.Request) -> web.StreamResponse:
        operation = self._find(request)
        if self.status(operation) != "done":
            return web.json_response({"detail": "not done"}, status=409)
        response = web.StreamResponse(
            headers={
                hdrs.CONTENT_TYPE: "application/x-ndjson",
                hdrs.CONTENT_LENGTH: str(sum(len(line) for line in result_lines(operation))),
            }
        )
        await response.prepare(request)
        chunk = bytearray()
        for line in result_lines(operation):
            chunk += line
            if len(chunk) >= CHUNK_BYTES:
                await response.write(bytes(chunk))
                chunk.clear()
        await response.write(bytes(chunk))
        await response.write_eof()
        return response

    async def cancel(self, request: web.Request) -> web.Response:
        operation = self._find(request)
        operation.canceled = True
        return self._describe(operation)

    def app(self) -> web.Application:
        @web.middleware
        async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self.faults:
                status = self.faults.popleft()
                return web.json_response({"detail": "injected fault"}, status=status)
            return await handler(request)

        app = web.Application(middlewares=[faults])
        app.router.add_post("/operations", self.create)
        app.router.add_get("/operations/{operation_id}", self.get)
        app.router.add_get("/operations/{operation_id}/result", self.result)
        app.router.add_delete("/operations/{operation_id}", self.cancel)
        return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A slow upstream API for the longdl example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of an operation")
    parser.add_argument("--retry-after", type=int, default=1, help="Retry-After while running")
    args = parser.parse_args(argv)
    upstream = Upstream(duration_s=args.seconds, retry_after_s=args.retry_after)
    web.run_app(upstream.app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
