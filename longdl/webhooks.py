"""Webhooks: a finished job's event POSTed to its ``callbackUrl``, signed per Standard Webhooks.

Deliveries are rows of the store. The store queues one itself, in the statement that
writes a job's final status (a trigger of the migration), so a process that dies right
after that write still delivers after its restart. One worker task sends them with
bounded concurrency through one ``aiohttp.ClientSession``, retries with exponential
backoff and full jitter, and sleeps until the next retry is due or a job finishes.

Signing (https://www.standardwebhooks.com):

- ``webhook-id``: the delivery id (``msg_…``), the same on every attempt;
- ``webhook-timestamp``: unix seconds of this attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``.

Secrets: ``whsec_<base64>`` (the spec's form, and what longdl generates into DATA_DIR
when ``WEBHOOK_SECRET`` is unset) signs with the decoded bytes; any other string signs
with its UTF-8 bytes (give the spec's libraries ``"whsec_" + base64(secret)``).

SSRF guard: a target whose host is ``localhost`` or whose address is private, loopback,
link-local, multicast, reserved or unspecified (IPv4, IPv6, and IPv4 embedded in IPv6)
is refused unless the host is in ``WEBHOOK_ALLOW_HOSTS``: at initiate time (literal
addresses and resolved names) and again when connecting, through a resolver that
checks every address it returns, so a name that changed its answer since is caught.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

import longdl
from longdl import exceptions, resource, retry
from longdl.config import (
    MIN_WEBHOOK_SECRET_BYTES,
    WEBHOOK_SECRET_PREFIX,
    Settings,
    check_webhook_secret,
    load_or_create_secret_file,
    webhook_key_bytes,
)
from longdl.models import Job, JobStatus, utc_iso
from longdl.store import WEBHOOKS_DUE, DeliveryStatus, Store, WebhookDelivery
from longdl.web import keys

log = logging.getLogger("longdl.webhooks")

#: Prefix of a serialized Standard Webhooks symmetric secret.
SECRET_PREFIX = WEBHOOK_SECRET_PREFIX
#: File in DATA_DIR holding the generated secret.
SECRET_FILE = "webhook-secret"
#: How far a received webhook's timestamp may be from now (the spec's 5 minutes).
DEFAULT_TOLERANCE_S = 300.0
#: The spec asks for symmetric secrets of at least 24 bytes (shorter ones are refused).
MIN_SECRET_BYTES = MIN_WEBHOOK_SECRET_BYTES
#: Time limit of resolving a callback host at initiate time.
RESOLVE_TIMEOUT_S = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


# --- secrets and signatures ------------------------------------------------------------


def signing_key(secret: str | bytes) -> bytes:
    """The HMAC key of a secret.

    ``whsec_<base64>`` is base64-decoded; bytes are used as they are; any other string
    is used as its UTF-8 bytes.

    Raises:
        ValueError: the secret is empty, or ``whsec_`` is not followed by base64.
    """
    key = secret if isinstance(secret, bytes) else webhook_key_bytes(secret)
    if not key:
        raise ValueError("the webhook secret may not be empty")
    return key


def new_secret() -> str:
    """A fresh secret in the Standard Webhooks form: ``whsec_`` and 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_of(settings: Settings) -> str:
    """``WEBHOOK_SECRET``, or the secret generated once into DATA_DIR."""
    if settings.webhook_secret:
        log.info("webhook.secret source=WEBHOOK_SECRET")
        return settings.webhook_secret
    path = settings.data_dir / SECRET_FILE
    secret = load_or_create_secret_file(path, new_secret, check_webhook_secret)
    log.info("webhook.secret source=%s (set WEBHOOK_SECRET to choose one)", path.resolve())
    return secret


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of the message."""
    message = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> Any:
    """Check a received webhook per Standard Webhooks and return its parsed JSON body.

    Pass the raw body as received: a body parsed and serialized again no longer matches.

    Args:
        secret: the sender's secret, in any form :func:`signing_key` takes.
        headers: the request headers (any case).
        body: the raw request body.
        tolerance_s: how far ``webhook-timestamp`` may be from ``now`` (replays).
        now: unix seconds, the current time when omitted.

    Raises:
        exceptions.InvalidWebhook: a header is missing or malformed, the timestamp is
            outside the tolerance, no ``v1`` signature matches, or the body is not JSON.
    """
    key = signing_key(secret)
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    timestamp_text = lowered.get("webhook-timestamp", "")
    signatures = lowered.get("webhook-signature", "")
    if not (msg_id and timestamp_text and signatures):
        raise exceptions.InvalidWebhook(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    if not (timestamp_text.isascii() and timestamp_text.isdigit()):
        raise exceptions.InvalidWebhook("webhook-timestamp is not unix seconds")
    timestamp = int(timestamp_text)
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise exceptions.InvalidWebhook(
            f"webhook-timestamp is more than {tolerance_s:g} s away from now"
        )
    raw = body.encode() if isinstance(body, str) else body
    expected = base64.b64decode(sign(key, msg_id, timestamp, raw).removeprefix("v1,"))
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue  # another scheme (v1a, a future version): not ours to judge
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            continue
        if hmac.compare_digest(expected, candidate):
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise exceptions.InvalidWebhook("the body is not JSON") from exc
    raise exceptions.InvalidWebhook("no webhook-signature matches")


# --- the SSRF guard --------------------------------------------------------------------


def _normal_host(host: str) -> str:
    """A host as compared with the allow-list: lower case, no brackets or final dot."""
    name = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def is_allowed(host: str, settings: Settings) -> bool:
    """Whether ``host`` is in ``WEBHOOK_ALLOW_HOSTS`` (so any address of it is fine)."""
    return _normal_host(host) in {_normal_host(h) for h in settings.webhook_allow_hosts}


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a transition-prefix IPv6 address leads to (6to4, Teredo, NAT64)."""
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress) -> str | None:
    """Why webhooks may not reach ``address``; None for a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A socket connecting to ::ffff:a.b.c.d reaches a.b.c.d itself.
        reason = address_refusal(address.ipv4_mapped)
        return None if reason is None else f"{reason} (as {address})"
    kinds = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    )
    for kind, matches in kinds:
        if matches:
            return f"{address} is a {kind} address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = address_refusal(embedded)
            if reason is not None:
                return f"{reason} (inside {address})"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def static_refusal(url: str, settings: Settings) -> str | None:
    """Why ``url`` may not be a webhook target, judged from its text alone (no DNS).

    A host name that is not ``localhost`` passes here; resolving it is the caller's
    next step (:func:`refusal`, or the connector's :class:`GuardedResolver`).
    """
    parsed = URL(url)
    if parsed.scheme not in ("http", "https"):
        return "it must be an http or https URL"
    host = parsed.host
    if not host:
        return "it has no host"
    if parsed.port == 0:
        return "port 0 cannot be connected to"
    if is_allowed(host, settings):
        return None
    name = _normal_host(host)
    if name == "localhost" or name.endswith(".localhost"):
        return f"{name} is a loopback name"
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return None
    return address_refusal(address)


async def refusal(url: str, settings: Settings) -> str | None:
    """Why ``url`` may not be a webhook target, resolving its host; None if it may."""
    reason = static_refusal(url, settings)
    parsed = URL(url)
    host = parsed.host or ""
    if reason is not None or is_allowed(host, settings):
        return reason
    try:
        ipaddress.ip_address(_normal_host(host))
        return None  # a public literal address
    except ValueError:
        pass
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, parsed.port or 0, type=socket.SOCK_STREAM
            )
    except UnicodeError:
        # The IDNA codec refuses it: an empty label, or one over 63 characters.
        return f"{host[:80]} is not a valid host name"
    except (OSError, TimeoutError):
        # A name that does not resolve now may resolve later; each delivery attempt
        # resolves and checks again, and gives up after its retries.
        return None
    for *_, sockaddr in infos:
        reason = address_refusal(ipaddress.ip_address(str(sockaddr[0])))
        if reason is not None:
            return f"{host} resolves to a refused address: {reason}"
    return None


async def check_target(url: object, settings: Settings) -> None:
    """Refuse a callback URL (a str or pydantic URL) webhooks may not reach; None passes.

    Raises:
        exceptions.WebhookTargetRefused: with the reason, for the client.
    """
    if url is None:
        return
    reason = await refusal(str(url), settings)
    if reason is not None:
        raise exceptions.WebhookTargetRefused(f"callbackUrl is not allowed: {reason}")


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing names that resolve to addresses webhooks may not reach.

    It runs when the connection is made, so the addresses checked are the ones
    connected to: a name re-pointed at a private address after initiate is caught.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not is_allowed(host, self._settings):
            for result in results:
                reason = address_refusal(ipaddress.ip_address(result["host"]))
                if reason is not None:
                    raise exceptions.WebhookTargetRefused(
                        f"{host} resolves to a refused address: {reason}"
                    )
        return results

    async def close(self) -> None:
        await self._inner.close()


# --- the payload -----------------------------------------------------------------------


def build_event(job: Job, event_type: str, public_url: str | None) -> dict[str, Any]:
    """The webhook body of ``event_type`` for ``job``: ``{type, timestamp, data}``.

    ``data`` is the job resource as the status route shows it, except that
    ``downloadUrl`` and ``result.url`` name the result route (which redirects to a
    freshly signed URL) rather than a signed URL that could expire before a late
    retry, ``result.expiresAt`` is null, and links are absolute when PUBLIC_URL is set.
    """
    status = JobStatus(event_type.removeprefix("job."))
    # The job may have expired since (a delivery resumed late): describe it as it was
    # when the event happened.
    snapshot = job if job.status is status else dataclasses.replace(job, status=status)
    data = resource.job_dict(snapshot)
    base = (public_url or "").rstrip("/")
    links = {name: base + path for name, path in data["links"].items()}
    data["links"] = links
    if status is JobStatus.COMPLETED and data["result"] is not None:
        data["downloadUrl"] = links["result"]
        data["result"] = {**data["result"], "url": links["result"]}
    return {
        "type": event_type,
        "timestamp": utc_iso(job.finished_at if job.finished_at is not None else job.updated_at),
        "data": data,
    }


# --- retry decisions (pure) ------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What to do with a delivery after an attempt."""

    #: ``delivered``, ``pending`` (retry after ``delay_s``) or ``failed``.
    status: DeliveryStatus
    delay_s: float = 0.0
    #: Why it was not delivered.
    reason: str | None = None


def retry_after_s(value: str | None) -> float | None:
    """Seconds of a ``Retry-After: <seconds>`` header; None when absent or a date."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def decide(
    attempt: int,
    *,
    status_code: int | None,
    error: str | None,
    age_s: float,
    settings: Settings,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> Outcome:
    """Judge attempt number ``attempt``: delivered, retry later, or give up.

    2xx is delivered; 410 Gone stops at once (the receiver wants no more); anything
    else (other statuses, connection errors, timeouts) is retried with exponential
    backoff and full jitter, at least ``Retry-After`` when the receiver sent one, until
    ``WEBHOOK_MAX_ATTEMPTS`` or ``WEBHOOK_MAX_AGE_S`` is reached.
    """
    if status_code is not None and 200 <= status_code < 300:
        return Outcome("delivered")
    reason = error if status_code is None else f"the receiver answered {status_code}"
    if status_code == 410:
        return Outcome("failed", reason=f"{reason} (Gone): no more attempts")
    if attempt >= settings.webhook_max_attempts:
        return Outcome("failed", reason=f"{reason}; gave up after {attempt} attempts")
    cap_s = settings.webhook_retry_max_ms / 1000
    delay_s = retry.backoff_s(attempt, settings.webhook_retry_base_ms / 1000, cap_s, rand)
    if retry_after is not None:
        delay_s = max(delay_s, min(retry_after, cap_s))
    if age_s + delay_s > settings.webhook_max_age_s:
        return Outcome(
            "failed",
            reason=f"{reason}; gave up: older than {settings.webhook_max_age_s:g} s",
        )
    return Outcome("pending", delay_s=delay_s, reason=reason)


# --- the worker ------------------------------------------------------------------------


@dataclass
class WebhookStats:
    """Counters since start-up, for metrics."""

    #: Requests sent.
    attempts: int = 0
    #: Deliveries a receiver acknowledged with 2xx.
    delivered: int = 0
    #: Attempts that failed and were scheduled again.
    retries: int = 0
    #: Deliveries given up (including refused ones).
    failed: int = 0
    #: Deliveries the SSRF guard stopped before any request.
    refused: int = 0


class WebhookWorker:
    """Sends pending deliveries: one loop task, named tasks per delivery, one session.

    Args:
        store: where deliveries are kept (opened by the caller).
        settings: timeouts, retries, allow-list, public URL.
        key: HMAC key of the signatures.
        worker_id: this process's worker id: deliveries are leased in its name, so that
            processes sharing a store send each one once at a time.
        clock: epoch seconds, injectable for tests.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        key: bytes,
        *,
        worker_id: str = "webhooks",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.stats = WebhookStats()
        self.worker_id = worker_id
        self._key = key
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def in_flight(self) -> int:
        """Deliveries being attempted right now."""
        return len(self._in_flight)

    async def start(self) -> None:
        """Open the HTTP session and start the delivery loop."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.settings)),
            timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            # Proxies from the environment would defeat the address checks.
            trust_env=False,
        )
        self._loop_task = asyncio.create_task(self._run(), name="longdl webhooks")

    async def stop(self) -> None:
        """Stop the loop; attempts still running after the grace are retried next start."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        tasks = list(self._in_flight.values())
        grace_s = min(self.settings.shutdown_grace_s, self.settings.webhook_timeout_s)
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def wake(self) -> None:
        """Look for due deliveries now."""
        self._wakeup.set()

    def on_job_change(self, job: Job) -> None:
        """Engine change listener: a job that finished with a callback has a delivery."""
        if job.status.finished and job.callback_url:
            self._wakeup.set()

    def on_change_elsewhere(self, job_id: str, status: str) -> None:
        """Store change listener: a job finished in any process may have a delivery, and
        a process that stopped mid-attempt left its deliveries due."""
        if status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED, WEBHOOKS_DUE):
            self._wakeup.set()

    # --- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        concurrency = self.settings.webhook_concurrency
        while True:
            self._wakeup.clear()
            next_at: float | None
            try:
                await self._start_due(concurrency - len(self._in_flight))
                next_at = await self.store.next_webhook_attempt_at()
            except exceptions.StoreUnavailable as exc:
                # The database is away (restarting, locked): a line each time, not a
                # traceback a second for as long as it lasts.
                log.warning("reading webhook deliveries failed: %r; retrying in 1 s", exc)
                next_at = self._clock() + 1
            except Exception:
                log.exception("reading webhook deliveries failed; retrying in 1 s")
                next_at = self._clock() + 1
            timeout_s: float | None = None
            if next_at is not None and len(self._in_flight) < concurrency:
                timeout_s = max(0.0, next_at - self._clock())
            # Woken by a finished job, a finished attempt or stop(); else the next retry.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wakeup.wait()

    @property
    def lease_s(self) -> float:
        """How long a claimed delivery is this worker's: an attempt's time limit, twice,
        plus a margin; a worker that dies mid-attempt is replaced after it."""
        return 2 * self.settings.webhook_timeout_s + 5

    async def _start_due(self, free: int) -> None:
        if free <= 0:
            return
        claimed = await self.store.claim_webhook_deliveries(self.worker_id, free, self.lease_s)
        for delivery in claimed:
            if delivery.id in self._in_flight:
                continue
            task = asyncio.create_task(
                self._deliver_safely(delivery), name=f"longdl webhook {delivery.id}"
            )
            self._in_flight[delivery.id] = task
            task.add_done_callback(functools.partial(self._done, delivery.id))

    def _done(self, delivery_id: str, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(delivery_id, None)
        self._wakeup.set()

    async def _deliver_safely(self, delivery: WebhookDelivery) -> None:
        try:
            await self._deliver(delivery)
        except Exception:
            log.exception("webhook.error job_id=%s delivery_id=%s", delivery.job_id, delivery.id)
            # Push it back so a persistent bug cannot spin the loop on it.
            with contextlib.suppress(Exception):
                await self.store.record_webhook_attempt(
                    delivery.id,
                    "pending",
                    attempted=False,
                    next_attempt_at=self._clock() + self.settings.webhook_retry_max_ms / 1000,
                    error="internal error",
                )

    # --- one attempt -------------------------------------------------------------------

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        age_s = self._clock() - delivery.created_at
        if age_s > self.settings.webhook_max_age_s:
            reason = f"gave up: older than {self.settings.webhook_max_age_s:g} s"
            await self._give_up(delivery, reason, attempted=False)
            return
        refused = static_refusal(delivery.url, self.settings)
        if refused is not None:
            await self._refuse(delivery, refused)
            return
        body = await self._body(delivery)
        if body is None:
            await self._give_up(delivery, "the job no longer exists", attempted=False)
            return
        status_code: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            status_code, retry_after = await self._post(delivery, body)
        except exceptions.WebhookTargetRefused as exc:
            await self._refuse(delivery, str(exc))
            return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = _describe(exc)
        self.stats.attempts += 1
        attempt = delivery.attempts + 1
        outcome = decide(
            attempt,
            status_code=status_code,
            error=error,
            age_s=age_s,
            settings=self.settings,
            retry_after=retry_after,
        )
        if outcome.status == "delivered":
            await self.store.record_webhook_attempt(
                delivery.id, "delivered", attempted=True, status_code=status_code
            )
            self.stats.delivered += 1
            log.info(
                "webhook.delivered job_id=%s delivery_id=%s attempt=%d status=%s",
                delivery.job_id,
                delivery.id,
                attempt,
                status_code,
            )
        elif outcome.status == "pending":
            await self.store.record_webhook_attempt(
                delivery.id,
                "pending",
                attempted=True,
                next_attempt_at=self._clock() + outcome.delay_s,
                error=outcome.reason,
                status_code=status_code,
            )
            self.stats.retries += 1
            log.warning(
                "webhook.retry job_id=%s delivery_id=%s attempt=%d delay_s=%.2f error=%s",
                delivery.job_id,
                delivery.id,
                attempt,
                outcome.delay_s,
                outcome.reason,
            )
        else:
            await self._give_up(
                delivery, outcome.reason or "failed", attempted=True, status_code=status_code
            )

    async def _body(self, delivery: WebhookDelivery) -> bytes | None:
        """The delivery's body: kept from its first attempt, or rendered from the job now."""
        if delivery.payload is not None:
            return delivery.payload.encode()
        job = await self.store.get_job(delivery.job_id)
        if job is None:
            return None
        event = build_event(job, delivery.event_type, self.settings.public_url)
        text = json.dumps(event, separators=(",", ":"))
        kept = await self.store.set_webhook_payload(delivery.id, text)
        return (kept or text).encode()

    async def _post(self, delivery: WebhookDelivery, body: bytes) -> tuple[int, float | None]:
        """Send one signed attempt; return the status code and any Retry-After seconds."""
        assert self._session is not None, "the worker is not started"
        headers = {
            **signed_headers(self._key, delivery.id, int(self._clock()), body),
            "Content-Type": "application/json",
            "User-Agent": f"longdl/{longdl.__version__}",
        }
        # Redirects count as failures (the spec's advice): following them would also
        # lead past the address checks.
        async with self._session.post(
            delivery.url, data=body, headers=headers, allow_redirects=False
        ) as response:
            return response.status, retry_after_s(response.headers.get("Retry-After"))

    async def _refuse(self, delivery: WebhookDelivery, reason: str) -> None:
        self.stats.refused += 1
        await self._give_up(delivery, f"refused target: {reason}", attempted=False)

    async def _give_up(
        self,
        delivery: WebhookDelivery,
        reason: str,
        *,
        attempted: bool,
        status_code: int | None = None,
    ) -> None:
        await self.store.record_webhook_attempt(
            delivery.id, "failed", attempted=attempted, error=reason, status_code=status_code
        )
        self.stats.failed += 1
        log.warning(
            "webhook.failed job_id=%s delivery_id=%s attempt=%d reason=%s",
            delivery.job_id,
            delivery.id,
            delivery.attempts + int(attempted),
            reason,
        )


def _describe(exc: BaseException) -> str:
    """A short reason for a failed attempt, without a traceback."""
    if isinstance(exc, TimeoutError):
        return "the receiver did not answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


#: How handlers (and /metrics) reach the worker.
WORKER = web.AppKey("webhooks", WebhookWorker)


async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` entry: run the worker while the app runs.

    Registered after the engine's, so it starts after the engine and stops before it.
    """
    settings = app[keys.SETTINGS]
    # Settings and the secret file both refuse keys under MIN_SECRET_BYTES.
    key = signing_key(secret_of(settings))
    worker = WebhookWorker(app[keys.STORE], settings, key, worker_id=app[keys.ENGINE].worker_id)
    app[WORKER] = worker
    await worker.start()
    remove_listener = app[keys.ENGINE].hub.add_listener(worker.on_job_change)
    # Deliveries a dead peer had in flight are due once a rescue finds it: claim them.
    remove_due_listener = app[keys.ENGINE].on_webhooks_due(worker.wake)
    # A job finished by another replica has a delivery too: claim it without waiting.
    app[keys.STORE].add_change_listener(worker.on_change_elsewhere)
    yield
    remove_due_listener()
    remove_listener()
    await worker.stop()
