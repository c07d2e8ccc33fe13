"""Request policy: who the caller is, API keys, rate limits, CORS and security headers.

:mod:`longdl.web.pipeline` applies these to every request, in this order::

    identify      request id; the caller's address and identity
    preflight     answers CORS preflights; refuses nothing else
    (problems)    every error below becomes problem+json
    deadline      REQUEST_TIMEOUT_MS for every request but streams (504)
    authenticate  Bearer keys on /v1 when API_KEYS is set
    rate limit    per-caller windows: one for /v1, a larger one for polling and the rest

Headers every response carries (request id, security, CORS, RateLimit-*) are added in
``on_response_prepare``, which aiohttp runs for every response it sends: handler
results, raised redirects, problems, files and event streams alike.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import math
import time
from collections.abc import Hashable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from aiohttp import hdrs, web
from yarl import URL

from longdl import ids
from longdl.config import Network, Settings, parse_api_keys, parse_networks
from longdl.web import keys
from longdl.web.problems import REQUEST_ID_HEADER, HTTPProblem, problem_response, single_header

if TYPE_CHECKING:
    import limits.aio.storage
    from limits.aio.strategies import FixedWindowRateLimiter

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
#: as does every route outside /v1 (see :meth:`Policy.plan`).
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
#: What stamp_headers adds to an answer that set none of them (most do), in one update.
API_HEADERS = {**SECURITY_HEADERS, "Content-Security-Policy": API_CSP}
PAGE_HEADERS = {**SECURITY_HEADERS, "Content-Security-Policy": PAGE_CSP}


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


class RateWindow(NamedTuple):
    """What the caller has left in its current window, for the RateLimit-* headers.

    A named tuple: immutable, and made on every request for less than a frozen
    dataclass, whose ``__init__`` sets each field through ``object.__setattr__``.
    """

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
    # Imported here: only a shared limiter needs the library (and its 2 MB of modules).
    import limits.aio.storage
    import limits.errors
    import limits.storage

    if not uri.startswith("async+"):
        uri = f"async+{uri}"
    try:
        storage = limits.storage.storage_from_string(uri)
    except limits.errors.ConfigurationError as exc:
        raise ValueError(f"RATE_LIMIT_STORAGE_URI: {exc}") from exc
    if not isinstance(storage, limits.aio.storage.Storage):
        raise ValueError(f"RATE_LIMIT_STORAGE_URI {uri!r} names no asyncio storage")
    return storage


class _Windows:
    """Fixed windows counted in this process: a window starts at a caller's first request
    and lasts ``window_s`` (as the limits library's fixed windows do)."""

    def __init__(self, window_s: int) -> None:
        self.window_s = window_s
        self._counts: dict[tuple[str, str], list[float]] = {}
        self._prune_at = 0.0

    def hit(self, key: tuple[str, str], now: float) -> tuple[int, float]:
        """Count one request; (requests in the window so far, when the window ends)."""
        entry = self._counts.get(key)
        if entry is None or now >= entry[0]:
            if now >= self._prune_at:
                self._prune(now)
            entry = self._counts[key] = [now + self.window_s, 0.0]
        entry[1] += 1
        return int(entry[1]), entry[0]

    def peek(self, key: tuple[str, str], now: float) -> tuple[int, float]:
        entry = self._counts.get(key)
        if entry is None or now >= entry[0]:
            return 0, now + self.window_s
        return int(entry[1]), entry[0]

    def _prune(self, now: float) -> None:
        """Forget ended windows, at most once a window: memory stays bounded by callers
        seen in the last window."""
        self._prune_at = now + self.window_s
        self._counts = {k: v for k, v in self._counts.items() if now < v[0]}


@dataclass(frozen=True, slots=True)
class Budget:
    """A number of requests per window, counted under its own name."""

    amount: int
    namespace: str


class RateLimiter:
    """Fixed windows per caller and budget, as the original service's limiter had.

    Counters are kept in this process's memory (each replica counts its own), or by the
    ``limits`` library in the storage ``RATE_LIMIT_STORAGE_URI`` names (a Redis shared by
    every replica, say), so a caller's budget is one across replicas; only then is the
    library imported. When that storage cannot answer, requests go through (logged): a
    rate limiter must not take the API down.
    """

    def __init__(self, settings: Settings) -> None:
        self.window_s = max(1, math.ceil(settings.rate_limit_window_ms / 1000))
        self._items = {
            "api": Budget(settings.rate_limit_max_requests, "api"),
            "poll": Budget(settings.rate_limit_poll_max_requests, "poll"),
            # Wrong API keys per address: counted only on failure, checked before a key is.
            "auth": Budget(settings.rate_limit_auth_failures, "auth"),
        }
        uri = settings.rate_limit_storage_uri
        self.shared = uri is not None
        self._limiter: FixedWindowRateLimiter | None = None
        self._shared_items: dict[str, limits.RateLimitItem] = {}
        if uri is not None:
            import limits
            from limits.aio.strategies import FixedWindowRateLimiter

            self._limiter = FixedWindowRateLimiter(shared_storage(uri))
            self._shared_items = {
                name: limits.RateLimitItemPerSecond(
                    budget.amount, self.window_s, namespace=budget.namespace
                )
                for name, budget in self._items.items()
            }
        self._windows = _Windows(self.window_s)

    def hit_here(self, budget: str, caller: str, now: float) -> tuple[bool, RateWindow]:
        """:meth:`hit` for a limiter that counts in this process (not :attr:`shared`),
        without awaiting: a dict lookup, where the library's storage takes ~35 us."""
        item = self._items[budget]
        count, reset_at = self._windows.hit((budget, caller), now)
        return count <= item.amount, self._window(item, item.amount - count, reset_at, now)

    async def hit(self, budget: str, caller: str, now: float) -> tuple[bool, RateWindow]:
        """Count one request; returns whether it is allowed and the window after it."""
        if not self.shared:
            return self.hit_here(budget, caller, now)
        item = self._items[budget]
        assert self._limiter is not None
        try:
            allowed = await self._limiter.hit(self._shared_items[budget], caller)
        except Exception as exc:
            log.warning("ratelimit.storage_failed error=%r", exc)
            return True, RateWindow(item.amount, item.amount, self.window_s, self.window_s)
        return allowed, await self.peek(budget, caller, now)

    async def peek(self, budget: str, caller: str, now: float) -> RateWindow:
        """The caller's window without counting a request (for answers given before the
        limiter ran: preflights, 401s)."""
        item = self._items[budget]
        if not self.shared:
            count, reset_at = self._windows.peek((budget, caller), now)
            return self._window(item, item.amount - count, reset_at, now)
        assert self._limiter is not None
        try:
            stats = await self._limiter.get_window_stats(self._shared_items[budget], caller)
        except Exception as exc:
            log.warning("ratelimit.storage_failed error=%r", exc)
            return RateWindow(item.amount, item.amount, self.window_s, self.window_s)
        return self._window(item, stats.remaining, stats.reset_time, now)

    def _window(self, item: Budget, remaining: int, reset_at: float, now: float) -> RateWindow:
        """The window of ``item`` with ``remaining`` requests left, ending at ``reset_at``."""
        return RateWindow(
            limit=item.amount,
            remaining=max(0, remaining),
            # The library's expiry can round past the window; never promise a later reset.
            reset_s=min(self.window_s, max(0, math.ceil(reset_at - now))),
            window_s=self.window_s,
        )

    async def exhausted(self, budget: str, caller: str, now: float) -> int | None:
        """Seconds until ``caller`` may try again when its ``budget`` is spent, else None.
        Counts nothing; a storage that cannot answer spends nothing (logged), as in hit."""
        item = self._items[budget]
        if not self.shared:
            count, reset_at = self._windows.peek((budget, caller), now)
            if count < item.amount:
                return None
            return max(1, min(self.window_s, math.ceil(reset_at - now)))
        assert self._limiter is not None
        shared_item = self._shared_items[budget]
        try:
            if await self._limiter.test(shared_item, caller):
                return None
            stats = await self._limiter.get_window_stats(shared_item, caller)
        except Exception as exc:
            log.warning("ratelimit.storage_failed error=%r", exc)
            return None
        return max(1, min(self.window_s, math.ceil(stats.reset_time - now)))


#: Peers whose caller address :class:`Policy` remembers (then it starts over).
PEERS_KEPT = 4096
#: The longest X-Forwarded-For remembered (a few hops); longer ones are read each time.
FORWARDED_KEPT_CHARS = 200
#: Plans :class:`Policy` keeps: routes times methods, a few dozen (a bound all the same).
PLANS_KEPT = 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """What the pipeline decides from a request's route and method alone: the route's
    template (for metrics), its deadline, the rate-limit budget it counts against and
    whether it needs a Bearer key. Worked out once per route and method."""

    template: str | None
    deadline_s: float | None
    budget: str
    guarded: bool


@dataclass(frozen=True)
class Policy:
    """What the middlewares need, parsed once from settings at start-up."""

    settings: Settings
    trusted_proxies: list[Network]
    api_keys: Mapping[str, str]
    limiter: RateLimiter
    metrics_token: str | None = None
    #: (peer address, X-Forwarded-For values) -> caller address.
    _callers: dict[tuple[str | None, tuple[str, ...]], str] = field(
        default_factory=dict, repr=False, compare=False
    )
    _plans: dict[tuple[str, Hashable], Plan] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            settings=settings,
            trusted_proxies=parse_networks(settings.trusted_proxies),
            api_keys=parse_api_keys(settings.api_keys),
            limiter=RateLimiter(settings),
            metrics_token=settings.metrics_token,
        )

    def caller_address(self, peer: str | None, forwarded_for: Sequence[str]) -> str:
        """:func:`client_address` of a request, remembered per peer and X-Forwarded-For
        (parsing the address was 3 % of a status poll, and behind a trusted proxy
        checking each hop against TRUSTED_PROXIES another 3 % of an initiate)."""
        if sum(map(len, forwarded_for)) > FORWARDED_KEPT_CHARS:  # not worth its memory
            return client_address(peer, forwarded_for, self.trusted_proxies)
        key = (peer, tuple(forwarded_for))
        address = self._callers.get(key)
        if address is None:
            if len(self._callers) >= PEERS_KEPT:
                self._callers.clear()
            address = client_address(peer, forwarded_for, self.trusted_proxies)
            self._callers[key] = address
        return address

    def plan(self, request: web.Request) -> Plan:
        """The :class:`Plan` of ``request``, kept per route and method: limits, deadlines,
        keys and metrics follow the matched route's template, never the raw path. An
        unmatched URL's plan is worked out from its path each time."""
        resource = request.match_info.route.resource
        if resource is None:
            return self._plan(request.method, None, request.path)
        key = (request.method, resource)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(request.method, resource.canonical, resource.canonical)
            if len(self._plans) < PLANS_KEPT:
                self._plans[key] = plan
        return plan

    def _plan(self, method: str, template: str | None, path: str) -> Plan:
        """The plan of a request to ``template`` (None: no route matched) at ``path``.

        - Deadline: REQUEST_TIMEOUT_MS for every request but streams.
        - Budget: ``api`` (RATE_LIMIT_MAX_REQUESTS) for /v1 but its polling reads;
          ``poll`` (RATE_LIMIT_POLL_MAX_REQUESTS) for those and for every route outside
          /v1 (/, /health, /metrics, /docs, /ui, /files, unknown URLs).
        - Guard: see :func:`guarded_path`.
        """
        limit_s = self.settings.request_timeout_ms / 1000
        reads = method in (hdrs.METH_GET, hdrs.METH_HEAD) and template in POLL_ROUTES
        return Plan(
            template=template,
            deadline_s=limit_s if limit_s and template not in STREAM_ROUTES else None,
            budget="poll" if reads or not _is_api(path) else "api",
            guarded=guarded_path(path, self.settings),
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
    return bool(settings.api_keys) and _is_api(path)


POLICY = web.AppKey("policy", Policy)
RATE_WINDOW = web.RequestKey("rate_window", RateWindow)


def _is_api(path: str) -> bool:
    """Whether ``path`` is under the versioned API, /v1."""
    return path.startswith("/v1/")


def identify(request: web.Request, policy: Policy) -> None:
    """Request id (echoed when sane, else a new UUID), caller address and identity."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request[keys.REQUEST_ID] = incoming if _safe_request_id(incoming) else ids.request_id()
    forwarded = request.headers.getall("X-Forwarded-For", ()) if policy.trusted_proxies else ()
    request[keys.CLIENT] = policy.caller_address(request.remote, forwarded)
    request[keys.CALLER] = ""


def _safe_request_id(value: str) -> bool:
    """Whether an incoming request id may be echoed (and logged): short, ASCII letters,
    digits and ``._:-``, nothing a header or a log line could trip on."""
    return 0 < len(value) <= 128 and all(
        c.isascii() and (c.isalnum() or c in "._:-") for c in value
    )


def preflight(request: web.Request, policy: Policy) -> web.Response | None:
    """The answer to a CORS preflight, or None for any other request (the CORS headers
    of actual requests are added at prepare time)."""
    if request.method != hdrs.METH_OPTIONS:
        return None
    origin = request.headers.get(hdrs.ORIGIN)
    if not origin or hdrs.ACCESS_CONTROL_REQUEST_METHOD not in request.headers:
        return None
    if policy.allowed_origin(origin) is None:
        return problem_response(
            request, HTTPProblem(403, "This origin may not call the API", code="CORS_REFUSED")
        )
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOWED_METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOWED_REQUEST_HEADERS,
            hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE_S),
        },
    )


def timed_out(limit_s: float) -> HTTPProblem:
    """The 504 of a request cut at its deadline."""
    return HTTPProblem(
        504,
        f"The request took longer than REQUEST_TIMEOUT_MS ({limit_s:g} s)",
        code="REQUEST_TIMEOUT",
        headers={hdrs.RETRY_AFTER: str(REQUEST_TIMEOUT_RETRY_AFTER_S)},
    )


async def authenticate(request: web.Request, policy: Policy) -> None:
    """With API_KEYS set, /v1 needs ``Authorization: Bearer <key>``; the key's name owns
    the caller's jobs. /metrics takes an API key or METRICS_TOKEN.

    Wrong credentials count against the caller's address (RATE_LIMIT_AUTH_FAILURES per
    window); once spent, the address gets 429 before any key is looked at, valid or not,
    so guessing learns nothing until the window resets.

    Raises:
        HTTPProblem: 401 without a valid key, 429 after too many wrong ones.
    """
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
    credentials = single_header(request, hdrs.AUTHORIZATION)
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
    if _is_api(request.path):
        request[keys.CALLER] = name
        request[keys.CLIENT] = name


def over_budget(window: RateWindow) -> HTTPProblem:
    """The 429 of a caller whose window is spent."""
    retry_after_s = max(1, window.reset_s)
    return HTTPProblem(
        429,
        f"Too many requests; try again in {retry_after_s} s",
        code="RATE_LIMITED",
        headers={hdrs.RETRY_AFTER: str(retry_after_s)},
    )


def add_vary(headers: MutableMapping[str, str], name: str) -> None:
    """Add ``name`` to the one Vary header (clients often read only the first)."""
    present = [v.strip() for v in headers.get(hdrs.VARY, "").split(",") if v.strip()]
    if name.lower() not in (v.lower() for v in present):
        headers[hdrs.VARY] = ", ".join([*present, name])


#: Set on a request whose response got its headers (from the pipeline, before prepare).
STAMPED = web.RequestKey("stamped", bool)


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Add the headers every response carries, just before it is sent: responses the
    pipeline did not stamp already (streams, files, redirects, errors of aiohttp's own)."""
    if request.get(STAMPED):
        return
    window = request.get(RATE_WINDOW)
    rules = request.app.get(POLICY)
    if window is None and rules is not None and keys.CLIENT in request:
        # Answered before the limiter counted it (a preflight, a 401): show the window.
        budget = rules.plan(request).budget
        window = await rules.limiter.peek(budget, request[keys.CLIENT], time.time())
        request[RATE_WINDOW] = window
    stamp(request, response)


def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """Add the headers every response carries (in one update of the response's headers:
    they are a C multidict, each single set costs)."""
    request[STAMPED] = True
    headers = response.headers
    app = request.app
    if "Content-Security-Policy" not in headers:
        # The header, not the property: that parses it (1.4 % of a status poll).
        is_page = headers.get(hdrs.CONTENT_TYPE, "").startswith("text/html")
        extra = dict(PAGE_HEADERS if is_page else API_HEADERS)
    else:
        extra = {name: v for name, v in SECURITY_HEADERS.items() if name not in headers}
    request_id = request.get(keys.REQUEST_ID)
    if request_id:
        extra[REQUEST_ID_HEADER] = request_id
    rules = app.get(POLICY)
    window = request.get(RATE_WINDOW)
    if window is not None:
        extra |= window.headers()
    worker_id = app.get(keys.WORKER_ID)
    if worker_id:
        # Which replica answered: behind a load balancer, any of them may.
        extra[REPLICA_HEADER] = worker_id
    headers.update(extra)
    origin = request.headers.get(hdrs.ORIGIN)
    if origin and rules is not None:
        allowed = rules.allowed_origin(origin)
        if allowed is not None:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
            headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS
            if allowed != "*":
                add_vary(headers, "Origin")


def install(app: web.Application, settings: Settings) -> None:
    """Parse the policy once and add the header hook (app.py orders the middlewares)."""
    app[POLICY] = Policy.from_settings(settings)
    app.on_response_prepare.append(stamp_headers)
