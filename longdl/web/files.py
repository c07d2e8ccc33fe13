"""``GET /files/{key}``: serves local-storage objects to holders of a signed URL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aiohttp import hdrs, web

from longdl import exceptions
from longdl.storage.base import content_disposition
from longdl.web import keys
from longdl.web.openapi import Param, Resp, doc, problem
from longdl.web.problems import HTTPProblem

routes = web.RouteTableDef()
FILE_MEDIA = ("application/zip", "application/octet-stream")


@routes.get("/files/{key:.+}")
@doc(
    "A stored object, for holders of a signed URL (local storage only)",
    tag="files",
    v1=False,
    params=[
        Param("key", "path", "Object key", required=True),
        Param("expires", "query", "Expiry (unix seconds)", required=True),
        Param("filename", "query", "Download name", required=True),
        Param("sig", "query", "HMAC signature", required=True),
        Param("Range", "header", "bytes=N- to resume"),
    ],
    responses={
        200: Resp("The file", media=FILE_MEDIA, schema={"type": "string"}),
        206: Resp("Part of the file", media=FILE_MEDIA, schema={"type": "string"}),
        403: problem("Bad or expired signature"),
        404: problem("The object no longer exists, or storage is not local"),
    },
)
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
