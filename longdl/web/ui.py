"""``GET /ui``: the web download manager, plain files from ``longdl/static/``.

No build step and nothing fetched from elsewhere: the page, its stylesheet and its ES
modules are served from the package, so it works offline. A Content-Security-Policy
holds the page to its own origin. Every file is served with ``Cache-Control: no-cache``
and a validator (ETag, Last-Modified): browsers revalidate with a cheap 304, and an
upgrade never leaves a stale script beside a new page (the names carry no content hash).
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import hdrs, web

from longdl.web.openapi import Param, Resp, doc, problem

#: Where the page's files live (package data).
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

#: The only file types served, with the types browsers need (module scripts are refused
#: under ``nosniff`` unless served as JavaScript).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}

#: The page talks to its own origin only. Downloads are navigations, which
#: ``connect-src`` does not govern, so signed S3 URLs on another host still work.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)

_SAFE_PATH = re.compile(r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-][A-Za-z0-9._-]*$")

routes = web.RouteTableDef()


def static_file(relative: str) -> Path:
    """The file under :data:`STATIC_DIR` named by ``relative``.

    Raises:
        web.HTTPNotFound: no such file, a type not served, or a path leaving the folder.
    """
    if not _SAFE_PATH.match(relative) or Path(relative).suffix not in CONTENT_TYPES:
        raise web.HTTPNotFound()
    path = (STATIC_DIR / relative).resolve()
    try:
        found = path.is_relative_to(STATIC_DIR) and path.is_file()
    except OSError:  # a name too long for the filesystem, say
        found = False
    if not found:
        raise web.HTTPNotFound()
    return path


def file_response(path: Path) -> web.FileResponse:
    """The file with its type, the cache policy and, for pages, the page's stricter CSP
    (the security headers every response carries are added by web.policy)."""
    headers: dict[str, str] = {
        hdrs.CONTENT_TYPE: CONTENT_TYPES[path.suffix],
        hdrs.CACHE_CONTROL: "no-cache",
    }
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return web.FileResponse(path, headers=headers)


@routes.get("/ui")
@doc(
    "The web download manager (works offline)",
    tag="ui",
    v1=False,
    responses={200: Resp("The page", media="text/html", schema={"type": "string"})},
)
async def page(request: web.Request) -> web.FileResponse:
    """The download manager."""
    return file_response(static_file("index.html"))


@routes.get("/ui/")
@doc(
    "Redirects to /ui",
    tag="ui",
    v1=False,
    responses={301: Resp("Moved to /ui", headers=("Location",))},
)
async def page_slash(request: web.Request) -> web.Response:
    # The page links its files by absolute path, but one canonical URL is tidier.
    raise web.HTTPMovedPermanently("/ui")


@routes.get("/ui/{path:.+}")
@doc(
    "A stylesheet, script or image of the page",
    tag="ui",
    v1=False,
    params=[Param("path", "path", "File path under the page's folder", required=True)],
    responses={
        200: Resp(
            "The file",
            media=tuple(sorted({t.split(";")[0] for t in CONTENT_TYPES.values()})),
            schema={"type": "string"},
        ),
        404: problem("No such file"),
    },
)
async def asset(request: web.Request) -> web.FileResponse:
    """A stylesheet, script or image of the page."""
    return file_response(static_file(request.match_info["path"]))
