"""Request policy: who the caller is, API keys, rate limits, CORS and security headers.

Middlewares, outermost first (app.py lists them in this order)::

    context      request id; the caller's address and identity
    cors         answers preflights; refuses nothing else
    problems     (longdl.web.problems) every error below becomes problem+json
    deadline     REQUEST_TIMEOUT_MS for every request but streams (504)
    auth         Bearer keys on /v1 when API_KEYS is set
    rate_limit   per-caller windows: one for /v1, a larger one for polling and the rest

Headers every response carries (request id, security, CORS, RateLimit-*) are added in
``on_response_prepare``, which aiohttp runs for every response it sends: handler
results, raised redirects, problems, files and event streams alike.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass

import limits
import limits.aio.storage
import limits.errors
import limits.storage
from aiohttp import hdrs, web
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter
from yarl import URL

from longdl.config import Network, Settings, parse_api_keys, parse_networks
from longdl.web import keys
from longdl.web.problems import REQUEST_ID_HEADER, HTTPProblem, problem_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("longdl.web")

#: Headers a proxy, load balancer, CDN or tunnel adds on the way to us: any of them means
#: the caller is not local, whatever its address or Host (DESIGN.md §3 lists them too).
PROXY_HEADERS = frozenset(
    {
        "forwarded",
        "via",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "client-ip",
        "x-cluster-client-ip",
        "x-original-forwarded-for",
        "fastly-client-ip",
        "cdn-loop",
    }
)
#: Families of such headers: every X-Forwarded-* (For, Host, Proto, Port, Prefix, ...),
#: Cloudflare's CF-* (CF-Connecting-IP, CF-Ray, CF-Visitor), AWS's X-Amzn-*, Envoy's
#: X-Envoy-*, Fly.io's Fly-*, Vercel's X-Vercel-*, Azure Front Door's X-Azure-*,
#: Google's X-AppEngine-*, Tailscale Funnel's Tailscale-*.
PROXY_HEADER_PREFIXES = (
    "x-forwarded-",
    "cf-",
    "x-amzn-",
    "x-envoy-",
    "fly-",
    "x-vercel-",
    "x-azure-",
    "x-appengine-",
    "tailscale-",
)


def is_proxy_header(name: str) -> bool:
    """Whether a request header named ``name`` was added by a proxy or tunnel."""
    lowered = name.lower()
    return lowered in PROXY_HEADERS or lowered.startswith(PROXY_HEADER_PREFIXES)


#: /v1 routes a polling client hits repeatedly; they get the larger RATE_LIMIT_POLL budget,
#: as does every route outside /v1 (see :func:`budget_of`).
POLL_ROUTES = frozenset(
    {
        "/v1/download/status/{job_id}",
        "/v1/download/{job_id}",
        "/v1/download/{job_id}/events",
    }
)

#: Routes that stream for as long as they need: no request deadline applies.
STREAM_ROUTES = frozenset({"/v1/download/{job_id}/events", "/files/{key}"})

#: The response header naming the replica (worker id) that answered.
REPLICA_HEADER = "Longdl-Replica"

#: Response headers a browser script may read across origins.
EXPOSED_HEADERS = (
    "Location, Retry-After, ETag, X-Request-ID, Idempotent-Replayed, Preference-Applied, "
    "RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, RateLimit-Policy"
)
ALLOWED_REQUEST_HEADERS = (
    "Authorization, Content-Type, Idempotency-Key, If-None-Match, Last-Event-ID, Prefer, "
    "X-Request-ID"
)
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
#: A request cut at REQUEST_TIMEOUT_MS is worth repeating (with its idempotency key: it
#: may have taken effect) after this long.
REQUEST_TIMEOUT_RETRY_AFTER_S = 2
PREFLIGHT_MAX_AGE_S = 600

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
}
#: Pages (the UI, the docs) load only what the service itself serves: it works offline.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"


# Every request parses its peer (and forwarded hops); the same few addresses recur.
@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Iterable[Network]
) -> str:
    """The caller's address: the peer, or from X-Forwarded-For when the peer is trusted.

    The chain is read right to left, skipping trusted proxies, so a client cannot choose
    its address by sending its own X-Forwarded-For.
    """
    trusted = list(trusted)
    peer_ip = _ip(peer or "")

    def is_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and any(ip in network for network in trusted)

    if not is_trusted(peer_ip):
        return str(peer_ip) if peer_ip is not None else (peer or "")
    chain = [part for header in forwarded_for for part in header.split(",") if part.strip()]
    for hop in reversed(chain):
        ip = _ip(hop)
        if ip is None:
            break
        if not is_trusted(ip):
            return str(ip)
    return str(peer_ip)


def origin_host(value: str | None) -> str | None:
    """The host of an Origin or Referer header value (None for absent or ``null``)."""
    if not value or value == "null":
        return None
    try:
        host = URL(value).host
    except ValueError:
        return None
    return host.strip("[]").lower() if host else None


def is_local_caller(request: web.Request, sync_origins: Iterable[str]) -> bool:
    """Whether the synchronous mode may answer this caller (DESIGN.md §3).

    Anything bearing a header a proxy or tunnel adds is remote, whatever Host says. Then
    a caller is local when its Origin (or Referer) host is allowed, or when it sent
    neither and connected from loopback. A forged Origin gains nothing ``Prefer: wait``
    does not give anyone: its own request held for at most SYNC_WAIT_MAX_S.
    """
    if any(is_proxy_header(name) for name in request.headers):
        return False
    allowed = {origin.strip("[]").lower() for origin in sync_origins}
    raw_origin = request.headers.get(hdrs.ORIGIN) or request.headers.get(hdrs.REFERER)
    if raw_origin is not None:
        return origin_host(raw_origin) in allowed
    peer = _ip(request.remote or "")
    return peer is not None and peer.is_loopback


@dataclass(frozen=True)
class RateWindow:
    """What the caller has left in its current window, for the RateLimit-* headers."""

    limit: int
    remaining: int
    reset_s: int
    window_s: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
            "RateLimit-Policy": f"{self.limit};w={self.window_s}",
        }


def shared_storage(uri: str) -> limits.aio.storage.Storage:
    """The ``limits`` async storage a URI names (``redis://`` is taken as
    ``async+redis://``).

    Raises:
        ValueError: the URI names no async storage, or its client library is missing.
    """
    if not uri.startswith("async+"):
        uri = f"async+{uri}"
    try:
        storage = limits.storage.storage_from_string(uri)
    except limits.errors.ConfigurationError as exc:
        raise ValueError(f"RATE_LIMIT_STORAGE_URI: {exc}") from exc
    if not isinstance(storage, limits.aio.storage.Storage):
        raise ValueError(f"RATE_LIMIT_STORAGE_URI {uri!r} names no asyncio storage")
    return storage


class RateLimiter:
    """Fixed windows per caller and budget, as the original service's limiter had.

    The ``limits`` library keeps the counters: in this process's memory (each replica
    counts its own), or in the storage ``RATE_LIMIT_STORAGE_URI`` names (a Redis shared by
    every replica, say), so a caller's budget is one across replicas. When that storage
    cannot answer, requests go through (logged): a rate limiter must not take the API down.
    """

    def __init__(self, settings: Settings) -> None:
        self.window_s = max(1, math.ceil(settings.rate_limit_window_ms / 1000))
        self._items = {
            "api": limits.RateLimitItemPerSecond(
                settings.rate_limit_max_requests, self.window_s, namespace="api"
            ),
            "poll": limits.RateLimitItemPerSecond(
                settings.rate_limit_poll_max_requests, self.window_s, namespace="poll"
            ),
            # Wrong API keys per address: counted only on failure, checked before a key is.
            "auth": limits.RateLimitItemPerSecond(
                settings.rate_limit_auth_failures, self.window_s, namespace="auth"
            ),
        }
        uri = settings.rate_limit_storage_uri
        self.shared = uri is not None
        self._limiter = FixedWindowRateLimiter(shared_storage(uri) if uri else MemoryStorage())

    async def hit(self, budget: str, caller: str, now: float) -> tuple[bool, RateWindow]:
        """Count one request; returns whether it is allowed and the window after it."""
        item = self._items[budget]
        try:
            allowed = await self._limiter.hit(item, caller)
        except Exception as exc:
            log.warning("ratelimit.storage_failed error=%r", exc)
            return True, RateWindow(item.amount, item.amount, self.window_s, self.window_s)
        return allowed, await self.peek(budget, caller, now)

    async def peek(self, budget: str, caller: str, now: float) -> RateWindow:
        """The caller's window without counting a request (for answers given before the
        limiter ran: preflights, 401s)."""
        item = self._items[budget]
        try:
            stats = await self._limiter.get_window_stats(item, caller)
        except Exception as exc:
            log.warning("ratelimit.storage_failed error=%r", exc)
            return RateWindow(item.amount, item.amount, self.window_s, self.window_s)
        return RateWindow(
            limit=item.amount,
            remaining=stats.remaining,
            # The library's expiry can round past the window; never promise a later reset.
            reset_s=min(self.window_s, max(0, math.ceil(stats.reset_time - now))),
            window_s=self.window_s,
        )

    async def exhausted(self, budget: str, caller: str, now: float) -> int | None:
        """Seconds until ``caller`` may try again when its ``budget`` is spent, else None.
        Counts nothing; a storage that cannot answer spends nothing (logged), as in hit."""
        item = self._items[budget]
        try:
            if await self._limiter.test(item, caller):
                return None
            stats = await self._limiter.get_window_stats(item, caller)
        except Exception as exc:
            log.warning("ratelimit.storage_failed error=%r", exc)
            return None
        return max(1, min(self.window_s, math.ceil(stats.reset_time - now)))


@dataclass(frozen=True)
class Policy:
    """What the middlewares need, parsed once from settings at start-up."""

    settings: Settings
    trusted_proxies: list[Network]
    api_keys: Mapping[str, str]
    limiter: RateLimiter
    metrics_token: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            settings=settings,
            trusted_proxies=parse_networks(settings.trusted_proxies),
            api_keys=parse_api_keys(settings.api_keys),
            limiter=RateLimiter(settings),
            metrics_token=settings.metrics_token,
        )

    def allowed_origin(self, origin: str) -> str | None:
        """The Access-Control-Allow-Origin value for ``origin``, or None if refused."""
        allowed = self.settings.cors_origins
        if "*" in allowed:
            return "*"
        return origin if origin.rstrip("/") in (o.rstrip("/") for o in allowed) else None

    def key_name(self, token: str) -> str | None:
        """The name of the API key ``token``, comparing every key in constant time."""
        # Header bytes that are not UTF-8 arrive as surrogates; surrogateescape gives the
        # bytes back (they match no key) instead of raising.
        sent = token.encode("utf-8", "surrogateescape")
        found = None
        for key, name in self.api_keys.items():
            if hmac.compare_digest(key.encode(), sent):
                found = name
        return found

    def guarded(self, request: web.Request) -> bool:
        """Whether ``request`` needs a Bearer key (see :func:`guarded_path`)."""
        return guarded_path(request.path, self.settings)

    def authorizes(self, request: web.Request, token: str) -> str | None:
        """Who ``token`` authenticates on this request: an API key's name, ``""`` for the
        metrics token on /metrics, None for nobody."""
        name = self.key_name(token)
        if name is None and self.metrics_token and request.path == "/metrics":
            sent = token.encode("utf-8", "surrogateescape")
            if hmac.compare_digest(self.metrics_token.encode(), sent):
                return ""
        return name


def guarded_path(path: str, settings: Settings) -> bool:
    """Whether requests to ``path`` need a Bearer key: /v1 with API_KEYS set, /metrics
    with API_KEYS or METRICS_TOKEN set (the OpenAPI document says the same)."""
    if path == "/metrics":
        return bool(settings.api_keys or settings.metrics_token)
    return bool(settings.api_keys) and path.startswith("/v1/")


POLICY = web.AppKey("policy", Policy)
RATE_WINDOW = web.RequestKey("rate_window", RateWindow)


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/v1/")


def route_template(request: web.Request) -> str | None:
    """The matched route's template (``/v1/download/status/{job_id}``); None if no route
    matched. Limits, deadlines and metrics key on it, never on the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


@web.middleware
async def context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id (echoed when sane, else a new UUID), caller address and identity."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request[keys.REQUEST_ID] = incoming if _safe_request_id(incoming) else str(uuid.uuid4())
    policy = request.app[POLICY]
    address = client_address(
        request.remote,
        request.headers.getall("X-Forwarded-For", []),
        policy.trusted_proxies,
    )
    request[keys.CLIENT] = address
    request[keys.CALLER] = ""
    return await handler(request)


def _safe_request_id(value: str) -> bool:
    """Whether an incoming request id may be echoed (and logged): short, ASCII letters,
    digits and ``._:-``, nothing a header or a log line could trip on."""
    return 0 < len(value) <= 128 and all(
        c.isascii() and (c.isalnum() or c in "._:-") for c in value
    )


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights; the headers of actual requests are added at prepare time."""
    origin = request.headers.get(hdrs.ORIGIN)
    if (
        request.method == hdrs.METH_OPTIONS
        and origin
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    ):
        allowed = request.app[POLICY].allowed_origin(origin)
        if allowed is None:
            return problem_response(
                request,
                HTTPProblem(403, "This origin may not call the API", code="CORS_REFUSED"),
            )
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOWED_METHODS,
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOWED_REQUEST_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE_S),
            },
        )
    return await handler(request)


@web.middleware
async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Cut any non-streaming request at REQUEST_TIMEOUT_MS with a 504 problem, so no
    slow dependency can hold a connection until a proxy kills it."""
    limit_s = request.app[keys.SETTINGS].request_timeout_ms / 1000
    if not limit_s or route_template(request) in STREAM_ROUTES:
        return await handler(request)
    timeout = asyncio.timeout(limit_s)
    try:
        async with timeout:
            return await handler(request)
    except TimeoutError as exc:
        if not timeout.expired():
            raise
        raise HTTPProblem(
            504,
            f"The request took longer than REQUEST_TIMEOUT_MS ({limit_s:g} s)",
            code="REQUEST_TIMEOUT",
            headers={hdrs.RETRY_AFTER: str(REQUEST_TIMEOUT_RETRY_AFTER_S)},
        ) from exc


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With API_KEYS set, /v1 needs ``Authorization: Bearer <key>``; the key's name owns
    the caller's jobs. /metrics takes an API key or METRICS_TOKEN.

    Wrong credentials count against the caller's address (RATE_LIMIT_AUTH_FAILURES per
    window); once spent, the address gets 429 before any key is looked at, valid or not,
    so guessing learns nothing until the window resets.
    """
    policy = request.app[POLICY]
    if not policy.guarded(request):
        return await handler(request)
    address = request[keys.CLIENT]
    retry_after_s = await policy.limiter.exhausted("auth", address, time.time())
    if retry_after_s is not None:
        log.info("auth.refused reason=too_many_failures client=%s", address)
        raise HTTPProblem(
            429,
            f"Too many wrong API keys from this address; try again in {retry_after_s} s",
            code="TOO_MANY_AUTH_FAILURES",
            headers={hdrs.RETRY_AFTER: str(retry_after_s)},
        )
    credentials = request.headers.get(hdrs.AUTHORIZATION)
    if credentials is None:
        raise HTTPProblem(
            401,
            "Send your API key as Authorization: Bearer <key>",
            code="UNAUTHORIZED",
            headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="longdl"'},
        )
    scheme, _, token = credentials.partition(" ")
    name = policy.authorizes(request, token.strip()) if scheme.lower() == "bearer" else None
    if name is None:
        await policy.limiter.hit("auth", address, time.time())
        log.info("auth.refused reason=invalid_key client=%s path=%s", address, request.path)
        raise HTTPProblem(
            401,
            "This API key is not valid",
            code="UNAUTHORIZED",
            headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="longdl", error="invalid_token"'},
        )
    if _is_api(request):
        request[keys.CALLER] = name
        request[keys.CLIENT] = name
    return await handler(request)


def budget_of(request: web.Request) -> str:
    """Which window a request counts against: ``api`` (RATE_LIMIT_MAX_REQUESTS) for /v1
    but its polling reads; ``poll`` (RATE_LIMIT_POLL_MAX_REQUESTS) for those and for every
    route outside /v1 (/, /health, /metrics, /docs, /ui, /files, unknown URLs)."""
    if not _is_api(request):
        return "poll"
    if request.method in (hdrs.METH_GET, hdrs.METH_HEAD) and route_template(request) in POLL_ROUTES:
        return "poll"
    return "api"


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the request against the caller's window; 429 with Retry-After once spent."""
    budget = budget_of(request)
    allowed, window = await request.app[POLICY].limiter.hit(
        budget, request[keys.CLIENT], time.time()
    )
    request[RATE_WINDOW] = window
    if not allowed:
        retry_after_s = max(1, window.reset_s)
        raise HTTPProblem(
            429,
            f"Too many requests; try again in {retry_after_s} s",
            code="RATE_LIMITED",
            headers={hdrs.RETRY_AFTER: str(retry_after_s)},
        )
    return await handler(request)


def add_vary(headers: MutableMapping[str, str], name: str) -> None:
    """Add ``name`` to the one Vary header (clients often read only the first)."""
    present = [v.strip() for v in headers.get(hdrs.VARY, "").split(",") if v.strip()]
    if name.lower() not in (v.lower() for v in present):
        headers[hdrs.VARY] = ", ".join([*present, name])


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Add the headers every response carries, just before it is sent."""
    headers = response.headers
    request_id = request.get(keys.REQUEST_ID)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    is_page = (response.content_type or "").startswith("text/html")
    headers.setdefault("Content-Security-Policy", PAGE_CSP if is_page else API_CSP)
    window = request.get(RATE_WINDOW)
    if window is None and POLICY in request.app and keys.CLIENT in request:
        # Answered before the limiter counted it (a preflight, a 401): show the window.
        window = await request.app[POLICY].limiter.peek(
            budget_of(request), request[keys.CLIENT], time.time()
        )
    if window is not None:
        headers.update(window.headers())
    worker_id = request.app.get(keys.WORKER_ID)
    if worker_id:
        # Which replica answered: behind a load balancer, any of them may.
        headers[REPLICA_HEADER] = worker_id
    origin = request.headers.get(hdrs.ORIGIN)
    if origin and POLICY in request.app:
        allowed = request.app[POLICY].allowed_origin(origin)
        if allowed is not None:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
            headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS
            if allowed != "*":
                add_vary(headers, "Origin")


def install(app: web.Application, settings: Settings) -> None:
    """Parse the policy once and add the header hook (app.py orders the middlewares)."""
    app[POLICY] = Policy.from_settings(settings)
    app.on_response_prepare.append(stamp_headers)
