"""``GET /files/{key}``: serves local-storage objects to holders of a signed URL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aiohttp import hdrs, web

from longdl import exceptions
from longdl.storage.base import content_disposition
from longdl.web import keys
from longdl.web.problems import HTTPProblem

routes = web.RouteTableDef()


@routes.get("/files/{key:.+}")
async def serve_file(request: web.Request) -> web.StreamResponse:
    # Only the local backend serves files (test twins wrapping it forward ``verify``).
    verify: Callable[[str, str, str, str], Path] | None = getattr(
        request.app[keys.STORAGE], "verify", None
    )
    if verify is None:
        raise web.HTTPNotFound()
    query = request.query
    try:
        path = verify(
            request.match_info["key"],
            query.get("expires", ""),
            query.get("filename", ""),
            query.get("sig", ""),
        )
    except exceptions.ObjectNotFound as exc:
        raise HTTPProblem(403, "Invalid link", code="INVALID_SIGNATURE") from exc
    if not path.is_file():
        raise HTTPProblem(404, "The file no longer exists", code="FILE_NOT_FOUND")
    return web.FileResponse(
        path,
        headers={
            hdrs.CONTENT_DISPOSITION: content_disposition(query.get("filename", path.name)),
            hdrs.CONTENT_TYPE: "application/zip"
            if path.suffix == ".zip"
            else "application/octet-stream",
            hdrs.CACHE_CONTROL: "private, no-store",
        },
    )
