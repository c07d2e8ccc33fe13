"""Bare aiohttp answering canned responses: the ceiling of any aiohttp service here.

``python bench/peers/aiohttp_canned.py PORT SPEC.json``; the spec lists routes, each with
the exact body (and ETag) longdl answered, so both send the same bytes. A route with an
``etag`` answers ``304`` to a matching ``If-None-Match``; a POST route reads its body.
A ``hold`` route holds every request until the process ends: ``"poll"`` answers nothing,
``"stream"`` sends an event stream's head and its body as one event first (the held
benchmark's baseline). A route's ``headers`` are sent as given (the status benchmark
sends every header longdl sent). No logging, no I/O, and no middleware unless the spec
says ``"middleware": true``: then one that only passes each request on.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

#: Never set: what a held request waits for.
FOREVER = web.AppKey("forever", asyncio.Event)


def handler(route: dict[str, Any]) -> Any:
    body = route["body"].encode()
    status = int(route.get("status", 200))
    content_type = route.get("content_type", "application/json")
    etag = route.get("etag")
    headers = {**route.get("headers", {}), **({"ETag": etag} if etag else {})}

    async def get(request: web.Request) -> web.Response:
        if etag and request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, status=status, content_type=content_type, headers=headers)

    async def post(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, status=status, content_type=content_type)

    async def hold(request: web.Request) -> web.StreamResponse:
        forever = request.app[FOREVER]
        if route["hold"] == "poll":
            await forever.wait()
            return web.Response(body=body, content_type=content_type)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: snapshot\nid: 1\ndata: %s\n\n" % body)
        await forever.wait()
        return response

    if "hold" in route:
        return hold
    return post if route.get("method", "GET") == "POST" else get


@web.middleware
async def passing(request: web.Request, handler: Any) -> web.StreamResponse:
    return await handler(request)  # type: ignore[no-any-return]


def main() -> None:
    port, spec = int(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    app = web.Application(middlewares=[passing] if spec.get("middleware") else [])

    async def forever(app: web.Application) -> None:
        app[FOREVER] = asyncio.Event()

    app.on_startup.append(forever)
    for route in spec["routes"]:
        app.router.add_route(route.get("method", "GET"), route["path"], handler(route))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
