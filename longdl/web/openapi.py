"""OpenAPI 3.1, generated from the app's routes and the pydantic models, and /docs.

Each route handler carries its documentation (:func:`doc`); :func:`build_spec` walks the
application's router, so a route cannot exist without appearing in the spec (a test
checks that every route is documented and that real responses match it). Schemas come
from the pydantic models of :mod:`longdl.models`; OpenAPI 3.1 speaks the same JSON
Schema dialect (2020-12) pydantic emits.

``/docs`` is Swagger UI served from the copy the ``swagger-ui-py`` package ships: no
CDN, so it works offline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import hdrs, web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

import longdl
from longdl import models
from longdl.web import keys, policy

F = TypeVar("F", bound=Callable[..., Any])
ParamIn = Literal["path", "query", "header"]

DOC_ATTR = "__longdl_openapi__"
PROBLEM_MEDIA = "application/problem+json"


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter."""

    name: str
    where: ParamIn
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Resp:
    """One documented response: a model (JSON), a media type with a plain schema, or
    nothing (redirects, 304)."""

    description: str
    model: type[BaseModel] | None = None
    #: One media type, or several the route may answer with.
    media: str | Sequence[str] = "application/json"
    schema: Mapping[str, Any] | None = None
    headers: Sequence[str] = ()
    #: OpenAPI links: name -> (operationId, {parameter: runtime expression}).
    links: Mapping[str, tuple[str, Mapping[str, str]]] = field(default_factory=dict)

    @property
    def media_types(self) -> tuple[str, ...]:
        return (self.media,) if isinstance(self.media, str) else tuple(self.media)


@dataclass(frozen=True)
class Doc:
    summary: str
    tag: str
    description: str = ""
    body: type[BaseModel] | None = None
    params: Sequence[Param] = ()
    responses: Mapping[int, Resp] = field(default_factory=dict)


def problem(description: str, *headers: str) -> Resp:
    return Resp(description, models.Problem, PROBLEM_MEDIA, headers=headers)


#: Errors any route can answer: every route counts against a rate limit window.
EVERY_ROUTE_ERRORS: Mapping[int, Resp] = {
    429: problem("Rate limit exceeded", "Retry-After"),
    500: problem("Unexpected error; the request id identifies it in logs"),
}
#: Errors any /v1 route can answer.
V1_ERRORS: Mapping[int, Resp] = {
    400: problem("API_KEYS is set and Authorization was sent more than once"),
    401: problem("API_KEYS is set and the Bearer key is missing or wrong", "WWW-Authenticate"),
    **EVERY_ROUTE_ERRORS,
    429: problem(
        "Rate limit exceeded, or too many wrong API keys from this address", "Retry-After"
    ),
}


def doc(
    summary: str,
    *,
    tag: str,
    description: str = "",
    body: type[BaseModel] | None = None,
    params: Sequence[Param] = (),
    responses: Mapping[int, Resp],
    v1: bool = True,
) -> Callable[[F], F]:
    """Attach the OpenAPI description of a route to its handler."""
    all_responses = {**(V1_ERRORS if v1 else EVERY_ROUTE_ERRORS), **responses}

    def attach(handler: F) -> F:
        setattr(
            handler,
            DOC_ATTR,
            Doc(summary, tag, description, body, tuple(params), all_responses),
        )
        return handler

    return attach


#: A job id as the service mints them (``str(uuid.uuid4())``).
UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
JOB_ID = Param(
    "job_id",
    "path",
    "The job's id (a UUID)",
    {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
    True,
)

#: Response headers, described once and referenced by name.
HEADERS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "Location": ("Where to look next", {"type": "string"}),
    "Retry-After": ("Seconds to wait before asking again", {"type": "integer"}),
    "ETag": ("Validator for If-None-Match", {"type": "string"}),
    "Idempotent-Replayed": ("true when an idempotency key replayed an earlier job", {}),
    "Preference-Applied": ("Which Prefer preference was honoured (RFC 7240)", {}),
    "WWW-Authenticate": ("The Bearer challenge", {"type": "string"}),
    "Allow": ("Methods this URL accepts", {"type": "string"}),
    "Accept-Encoding": ("Content codings a request body may have (RFC 9110)", {}),
}
EVERY_RESPONSE_HEADERS = ("X-Request-ID",)
#: On every response too; which window a route counts against is in Policy.plan.
RATE_LIMIT_HEADERS = (
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "RateLimit-Policy",
)


def _header_components() -> dict[str, Any]:
    components: dict[str, Any] = {
        name: {"description": text, "schema": schema or {"type": "string"}}
        for name, (text, schema) in HEADERS.items()
    }
    components["X-Request-ID"] = {
        "description": "Echoed when sent (if sane), else a new UUID",
        "schema": {"type": "string"},
    }
    for name in RATE_LIMIT_HEADERS:
        components[name] = {
            "description": "Rate limit state of the caller (IETF RateLimit fields)",
            "schema": {"type": "string"},
        }
    return components


def _models(
    operations: Sequence[Doc],
) -> list[tuple[type[BaseModel], Literal["validation", "serialization"]]]:
    found: dict[tuple[type[BaseModel], str], None] = {}
    for operation in operations:
        if operation.body is not None:
            found[(operation.body, "validation")] = None
        for response in operation.responses.values():
            if response.model is not None:
                found[(response.model, "serialization")] = None
    return list(found)  # type: ignore[arg-type]


def _parameter(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": param.name,
        "in": param.where,
        "description": param.description,
        "schema": dict(param.schema),
    }
    if param.required or param.where == "path":
        out["required"] = True
    return out


def operation_id(method: str, path: str) -> str:
    """``get_v1_download_status_job_id`` for ``GET /v1/download/status/{job_id}``."""
    if path == "/":
        return f"{method}_root"
    words = path.replace("{", "").replace("}", "").replace(".", "_").strip("/").split("/")
    if path.endswith("/"):
        words.append("index")
    return "_".join([method, *(word.replace("-", "_") for word in words if word)])


def build_spec(app: web.Application, *, server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document of ``app``: every documented route of its router."""
    operations: dict[str, dict[str, Any]] = {}
    docs: list[Doc] = []
    routes: list[tuple[str, str, Doc]] = []
    for route in app.router.routes():
        operation_doc: Doc | None = getattr(route.handler, DOC_ATTR, None)
        if operation_doc is None or route.method == hdrs.METH_HEAD or route.resource is None:
            continue
        routes.append((route.resource.canonical, route.method.lower(), operation_doc))
        docs.append(operation_doc)

    settings = app[keys.SETTINGS]
    refs, schemas = models_json_schema(_models(docs), ref_template="#/components/schemas/{model}")
    for path, method, operation_doc in routes:
        operation: dict[str, Any] = {
            "summary": operation_doc.summary,
            "tags": [operation_doc.tag],
            "operationId": operation_id(method, path),
            "responses": {},
        }
        if operation_doc.description:
            operation["description"] = operation_doc.description
        # Per operation: /health, the UI, the docs and signed files never take a key.
        operation["security"] = [{"apiKey": []}] if policy.guarded_path(path, settings) else []
        if operation_doc.params:
            operation["parameters"] = [_parameter(p) for p in operation_doc.params]
        if operation_doc.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": refs[(operation_doc.body, "validation")]}
                },
            }
        for status, response in sorted(operation_doc.responses.items()):
            out: dict[str, Any] = {"description": response.description}
            header_names = [*EVERY_RESPONSE_HEADERS, *RATE_LIMIT_HEADERS, *response.headers]
            out["headers"] = {
                name: {"$ref": f"#/components/headers/{name}"} for name in header_names
            }
            schema = None
            if response.model is not None:
                schema = refs[(response.model, "serialization")]
            elif response.schema is not None:
                schema = dict(response.schema)
            if schema is not None:
                out["content"] = {media: {"schema": schema} for media in response.media_types}
            if response.links:
                out["links"] = {
                    name: {"operationId": target, "parameters": dict(parameters)}
                    for name, (target, parameters) in response.links.items()
                }
            operation["responses"][str(status)] = out
        operations.setdefault(path, {})[method] = operation

    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "longdl",
            "version": longdl.__version__,
            "description": (
                "Long-running download jobs behind proxies and tunnels: initiate answers "
                "at once with a job id; poll, long-poll or stream progress, then fetch "
                "the result through a short-lived signed URL."
            ),
        },
        "tags": [
            {"name": "downloads", "description": "Start, follow, fetch and cancel jobs"},
            {"name": "ui", "description": "The web download manager"},
            {"name": "files", "description": "Signed downloads from local storage"},
            {"name": "service", "description": "Health, metrics and these documents"},
        ],
        "paths": dict(sorted(operations.items())),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "headers": _header_components(),
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
    if server_url:
        spec["servers"] = [{"url": server_url}]
    return spec


routes = web.RouteTableDef()
SPEC = web.AppKey("openapi_spec", dict)


@routes.get("/openapi.json")
@doc(
    "This OpenAPI document",
    tag="service",
    v1=False,
    responses={200: Resp("OpenAPI 3.1", schema={"type": "object"})},
)
async def openapi_json(request: web.Request) -> web.Response:
    return spec_response(request)


def spec_response(request: web.Request) -> web.Response:
    return web.json_response(request.app[SPEC], headers={hdrs.CACHE_CONTROL: "public, max-age=300"})


def install(app: web.Application) -> None:
    """Add the spec and docs routes; the spec is built once all routes exist (start-up)."""
    app.router.add_routes(routes)

    async def build(app: web.Application) -> None:
        app[SPEC] = build_spec(app, server_url=app[keys.SETTINGS].public_url)

    app.on_startup.append(build)


@routes.get("/openapi")
@doc(
    "This OpenAPI document (alias of /openapi.json)",
    tag="service",
    v1=False,
    responses={200: Resp("OpenAPI 3.1", schema={"type": "object"})},
)
async def openapi_alias(request: web.Request) -> web.Response:
    return spec_response(request)


def swagger_ui_dir() -> Path:
    """Swagger UI's files as the swagger-ui-py package ships them (found, not imported:
    importing it would load its template engine for nothing)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>longdl API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <link rel="icon" href="/docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/swagger-ui-standalone-preset.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""

# A file, not an inline script, so the page keeps a strict Content-Security-Policy.
DOCS_INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    displayRequestDuration: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "BaseLayout"
  });
});
"""

DOCS_ASSETS = frozenset(
    {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "favicon-32x32.png",
        "favicon-16x16.png",
    }
)


@routes.get("/docs")
@doc(
    "Interactive API documentation (works offline)",
    tag="service",
    v1=False,
    responses={200: Resp("Swagger UI", media="text/html", schema={"type": "string"})},
)
async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")


@routes.get("/docs/init.js")
@doc(
    "Script of the docs page",
    tag="service",
    v1=False,
    responses={200: Resp("JavaScript", media="text/javascript", schema={"type": "string"})},
)
async def docs_init(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_INIT, content_type="text/javascript")


@routes.get("/docs/assets/{name}")
@doc(
    "Swagger UI's files",
    tag="service",
    v1=False,
    params=[Param("name", "path", "File name", required=True)],
    responses={
        200: Resp(
            "The file",
            media=("text/css", "text/javascript", "image/png"),
            schema={"type": "string"},
        ),
        404: problem("No such file"),
    },
)
async def docs_asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in DOCS_ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(
        swagger_ui_dir() / name, headers={hdrs.CACHE_CONTROL: "public, max-age=86400"}
    )
