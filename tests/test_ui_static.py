"""How ``/ui`` and its files are served: types, caching, the CSP, and nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from longdl.web import ui


async def test_ui_page_is_html_held_to_its_own_origin(client: TestClient[Any, Any]) -> None:
    """``GET /ui`` is the page, revalidated on each load and locked to the app's origin."""
    response = await client.get("/ui")
    assert 200 == response.status
    assert "text/html; charset=utf-8" == response.headers["Content-Type"]
    assert "no-cache" == response.headers["Cache-Control"]
    assert ui.CONTENT_SECURITY_POLICY == response.headers["Content-Security-Policy"]
    assert '<script type="module" src="/ui/app.js">' in await response.text()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/longdl-client.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ],
)
async def test_assets_have_their_types_and_a_validator(
    client: TestClient[Any, Any], path: str, content_type: str
) -> None:
    """Each file the page loads comes with the type browsers require and an ETag."""
    response = await client.get(path)
    assert (200, content_type) == (response.status, response.headers["Content-Type"])
    assert "no-cache" == response.headers["Cache-Control"]
    assert "nosniff" == response.headers["X-Content-Type-Options"]
    assert response.headers["ETag"]


async def test_unchanged_asset_revalidates_with_304(client: TestClient[Any, Any]) -> None:
    """A reload with the ETag it already has gets 304 and no body."""
    first = await client.get("/ui/longdl-client.js")
    again = await client.get(
        "/ui/longdl-client.js", headers={"If-None-Match": first.headers["ETag"]}
    )
    assert (304, b"") == (again.status, await again.read())


@pytest.mark.parametrize(
    "path",
    [
        "/ui/missing.js",
        "/ui/../web/ui.py",
        "/ui/%2e%2e/config.py",
        "/ui/..%2fconfig.py",
        "/ui/.hidden.js",
        "/ui/app.js.map",
    ],
)
async def test_only_the_page_files_are_served(client: TestClient[Any, Any], path: str) -> None:
    """Unknown names, other file types and paths out of the folder are 404 problems."""
    response = await client.get(path)
    assert (404, "application/problem+json") == (response.status, response.content_type)


async def test_trailing_slash_redirects_to_the_page(client: TestClient[Any, Any]) -> None:
    """``/ui/`` sends browsers to the one URL of the page."""
    response = await client.get("/ui/", allow_redirects=False)
    assert (301, "/ui") == (response.status, response.headers["Location"])
