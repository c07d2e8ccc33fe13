"""RFC 9457 problem responses, request ids, and the middleware that maps errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import pydantic
import pydantic_core
from aiohttp import compression_utils, hdrs, web

from longdl import exceptions
from longdl.models import NO_NUL, Problem, ProblemFieldError
from longdl.web import keys

log = logging.getLogger("longdl.web")

PROBLEM_TYPE = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-ID"

#: The ``code`` of a problem raised without one (aiohttp's own 404, 405, 413...).
STATUS_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "BODY_TOO_LARGE",
}

#: Prefixes pydantic puts before the message of an error raised in a validator.
_LIBRARY_PREFIXES = ("Value error, ", "Assertion failed, ")


class HTTPProblem(Exception):
    """Raised by handlers to answer with a problem response."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        title: str | None = None,
        code: str | None = None,
        errors: list[ProblemFieldError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title or str(status))
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.code = code or STATUS_CODES.get(status) or HTTPStatus(status).name
        self.errors = errors
        self.headers = dict(headers or {})


def request_id(request: web.Request) -> str:
    return str(request.get(keys.REQUEST_ID, ""))


def problem_response(request: web.Request, problem: HTTPProblem) -> web.Response:
    body = Problem(
        type=f"https://longdl.dev/problems/{problem.code.lower().replace('_', '-')}",
        title=problem.title,
        status=problem.status,
        detail=problem.detail,
        requestId=request_id(request) or None,
        errors=problem.errors,
        code=problem.code,
    )
    return web.Response(
        status=problem.status,
        text=body.model_dump_json(exclude_none=True),
        content_type=PROBLEM_TYPE,
        headers=problem.headers,
    )


def _normalized(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def field_message(error: pydantic_core.ErrorDetails) -> str:
    """The message of one validation error, without pydantic's prefixes; a missing field
    sent under another spelling (``fileIds`` for ``file_ids``) says which one to send."""
    if error["type"] == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == NO_NUL:
        return "must not contain NUL characters"
    message = error["msg"]
    for prefix in _LIBRARY_PREFIXES:
        message = message.removeprefix(prefix)
    if error["type"] == "missing" and error["loc"] and isinstance(error["input"], dict):
        wanted = str(error["loc"][-1])
        misspelt = [
            str(key)
            for key in error["input"]
            if key != wanted and _normalized(str(key)) == _normalized(wanted)
        ]
        if misspelt:
            message += f"; the field is {wanted}, not {misspelt[0]}"
    return message


def validation_problem(exc: pydantic.ValidationError) -> HTTPProblem:
    errors = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"]) or "body"
        errors.append(ProblemFieldError(field=location, message=field_message(error)))
    invalid_json = any(e["type"] == "json_invalid" for e in exc.errors())
    detail = "The request body is not valid JSON" if invalid_json else "The request is invalid"
    return invalid_request(detail, errors)


def invalid_request(detail: str, errors: list[ProblemFieldError] | None = None) -> HTTPProblem:
    """The 400 of a request that breaks the API's rules (``errors``: per field)."""
    return HTTPProblem(400, detail, title="Invalid request", code="VALIDATION_ERROR", errors=errors)


def single_header(request: web.Request, name: str) -> str | None:
    """The value of a header that must come once, None when absent; 400 when it came
    more than once: which line counts would depend on who reads it (a proxy in front
    may have read the other)."""
    sent = request.headers.getall(name, ())
    if len(sent) > 1:
        raise invalid_request(f"Send one {name} header")
    return sent[0] if sent else None


def problem_for(exc: Exception) -> HTTPProblem | None:
    """The problem a domain error maps to, or None for an unexpected error."""
    if isinstance(exc, HTTPProblem):
        return exc
    if isinstance(exc, pydantic.ValidationError):
        return validation_problem(exc)
    if isinstance(exc, exceptions.JobNotFound):
        return HTTPProblem(404, "No such job", code="JOB_NOT_FOUND")
    if isinstance(exc, exceptions.JobFinished):
        return HTTPProblem(409, f"The job is already {exc.status}", code="JOB_FINISHED")
    if isinstance(exc, exceptions.IdempotencyMismatch):
        return HTTPProblem(422, str(exc), code="IDEMPOTENCY_KEY_REUSED")
    if isinstance(exc, exceptions.TooManyActiveJobs):
        return HTTPProblem(
            429,
            str(exc),
            code="TOO_MANY_ACTIVE_JOBS",
            headers={hdrs.RETRY_AFTER: str(exc.retry_after_s)},
        )
    if isinstance(exc, exceptions.Overloaded):
        return HTTPProblem(
            503, str(exc), code="OVERLOADED", headers={hdrs.RETRY_AFTER: str(exc.retry_after_s)}
        )
    if isinstance(exc, exceptions.StoreUnavailable):
        code = {
            exceptions.StoreBusy: "DATABASE_BUSY",
            exceptions.StoreFull: "DISK_FULL",
        }.get(type(exc), "DATABASE_UNAVAILABLE")
        return HTTPProblem(
            503, str(exc), code=code, headers={hdrs.RETRY_AFTER: str(exc.retry_after_s)}
        )
    if isinstance(exc, exceptions.Unstorable):
        return invalid_request(
            "The request holds a value the job database cannot store (a NUL character?)"
        )
    if isinstance(exc, exceptions.InvalidSignature):
        return HTTPProblem(403, str(exc), code="INVALID_SIGNATURE")
    if isinstance(exc, exceptions.WebhookTargetRefused):
        return invalid_request(
            "The request is invalid",
            [ProblemFieldError(field="callbackUrl", message=str(exc))],
        )
    return None


def _from_http_exception(exc: web.HTTPException) -> HTTPProblem:
    headers = {
        k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
    }
    detail: str | None = None
    if exc.status == 404:
        detail = "No route matches this URL"
    elif exc.status == 405:
        detail = f"Allowed methods: {headers.get('Allow', '')}"
    elif exc.status == 413:
        detail = "The request body is too large"
    elif exc.text and not exc.text.startswith(f"{exc.status}:"):
        detail = exc.text
    return HTTPProblem(exc.status, detail, headers=headers)


def from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    """The problem answer of an error aiohttp raised (404, 405, 413, ...)."""
    return problem_response(request, _from_http_exception(exc))


def from_exception(request: web.Request, exc: Exception) -> web.Response:
    """The problem answer of an error raised below; never leaks internals in a 500."""
    problem = problem_for(exc)
    if problem is None:
        log.exception("unhandled error request_id=%s", request_id(request))
        problem = HTTPProblem(
            500,
            "Something went wrong on our side; the request id identifies it in logs",
            code="INTERNAL_ERROR",
        )
    return problem_response(request, problem)


#: The content codings of a request body aiohttp decodes here. Any other it would hand
#: over as it came, undecoded: those are refused (415).
BODY_CODINGS = frozenset(
    ("identity", "gzip", "deflate")
    + (("br",) if compression_utils.HAS_BROTLI else ())
    + (("zstd",) if compression_utils.HAS_ZSTD else ())
)


async def read_json(request: web.Request) -> bytes:
    """The raw body of a JSON request; 415 for another media type or a content coding not
    decoded here, 400 for a body that does not decode as its Content-Encoding says or
    that stopped short (its client left: nothing to log)."""
    try:
        body = await request.read()
    except web.RequestPayloadError as exc:
        raise HTTPProblem(
            400, "The request body does not decode as its Content-Encoding says"
        ) from exc
    except ConnectionError as exc:
        raise HTTPProblem(
            400, "The connection closed before the request body was complete"
        ) from exc
    # Checked once read: a body left unread in a coding aiohttp does decode (one of
    # two listed) fails as aiohttp drains it, and it logs that as an error.
    codings = request.headers.getall(hdrs.CONTENT_ENCODING, ())
    if len(codings) > 1 or any(c.lower() not in BODY_CODINGS for c in codings):
        raise HTTPProblem(
            415,
            f"Send the body with one Content-Encoding of {', '.join(sorted(BODY_CODINGS))}",
            code="UNSUPPORTED_MEDIA_TYPE",
            headers={hdrs.ACCEPT_ENCODING: ", ".join(sorted(BODY_CODINGS - {"identity"}))},
        )
    ctype = request.content_type
    if body and ctype not in ("application/json",) and not ctype.endswith("+json"):
        raise HTTPProblem(
            415,
            "Send the body as JSON with Content-Type: application/json",
            code="UNSUPPORTED_MEDIA_TYPE",
        )
    return body or b"{}"


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))
