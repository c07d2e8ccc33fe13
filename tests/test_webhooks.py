"""Webhooks: signed deliveries to a real receiver on loopback, retries, restarts, SSRF guard."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import sqlite3
import stat
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from service import ServiceProcess
from standardwebhooks.webhooks import Webhook

from longdl import exceptions, webhooks
from longdl.config import Settings
from longdl.models import Progress
from longdl.store import NewJob, SQLiteStore, Store, WebhookDelivery
from longdl.web import keys
from tests.conftest import AppFactory, finished, initiate, wait_for

#: A Standard Webhooks secret (32 random-looking bytes, base64 behind whsec_).
SECRET = "whsec_" + base64.b64encode(b"longdl webhook test secret 32by").decode()


def hook_settings(**overrides: Any) -> dict[str, Any]:
    """Settings for webhooks to the loopback receiver, retrying within milliseconds."""
    base: dict[str, Any] = {
        "webhook_allow_hosts": ["127.0.0.1"],
        "webhook_secret": SECRET,
        "webhook_retry_base_ms": 10,
        "webhook_retry_max_ms": 50,
    }
    base.update(overrides)
    return base


@dataclass
class Received:
    """One request the receiver got, and what it answered."""

    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """A real HTTP server on loopback that records webhooks and answers as scripted."""

    url: str = ""
    #: Statuses to answer in order; ``default`` after them.
    script: list[int] = field(default_factory=list)
    default: int = 204
    requests: list[Received] = field(default_factory=list)
    #: Until it is set, requests wait here unanswered and unrecorded: deliveries in flight.
    stall: asyncio.Event | None = None
    stalled: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.stall is not None and not self.stall.is_set():
            self.stalled += 1
            await self.stall.wait()
            return web.Response(status=503)
        status = self.script.pop(0) if self.script else self.default
        self.requests.append(Received(dict(request.headers), body, status))
        return web.Response(status=status)

    def acknowledged(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.answered < 300]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    """A webhook receiver listening on 127.0.0.1."""
    return await start_receiver(aiohttp_server)


async def start_receiver(aiohttp_server: Any) -> Receiver:
    """A webhook receiver on 127.0.0.1, served by pytest-aiohttp's ``aiohttp_server``."""
    recorder = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recorder.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    recorder.url = str(server.make_url("/hook"))
    return recorder


async def delivery_when(
    client: TestClient[Any, Any], job_id: str, status: str, timeout_s: float = 20.0
) -> WebhookDelivery:
    """Wait until the job's only delivery has ``status``; return it."""

    async def probe() -> WebhookDelivery | None:
        rows = await client.app[keys.STORE].webhook_deliveries_of(job_id)
        return rows[0] if len(rows) == 1 and rows[0].status == status else None

    return await wait_for(probe, timeout_s)


async def acknowledged(receiver: Receiver, count: int = 1, timeout_s: float = 20.0) -> Received:
    """Wait until the receiver acknowledged ``count`` deliveries; return the last."""

    async def probe() -> Received | None:
        done = receiver.acknowledged()
        return done[-1] if len(done) >= count else None

    return await wait_for(probe, timeout_s)


def loopback_name() -> str:
    """This machine's host name, when it resolves only to non-public addresses."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        pytest.skip(f"the host name {name!r} does not resolve")
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    if any(webhooks.address_refusal(a) is None for a in addresses):
        pytest.skip(f"the host name {name!r} resolves to a public address")
    return name


# --- signatures ------------------------------------------------------------------------


def test_signature_matches_the_reference_example() -> None:
    """Signing the Standard Webhooks reference library's published example gives its signature."""
    key = webhooks.signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = webhooks.sign(
        key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=" == signature


def test_signature_is_the_hmac_of_id_timestamp_and_body() -> None:
    """The signature is base64 HMAC-SHA256 of "{id}.{timestamp}.{body}" with the decoded secret."""
    body = b'{"type":"job.completed"}'
    digest = hmac.new(
        base64.b64decode(SECRET.removeprefix("whsec_")),
        b"msg_1." + b"1700000000." + body,
        hashlib.sha256,
    ).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    assert expected == webhooks.sign(webhooks.signing_key(SECRET), "msg_1", 1700000000, body)


def _signed(body: bytes, timestamp: int, secret: str = SECRET) -> dict[str, str]:
    return webhooks.signed_headers(webhooks.signing_key(secret), "msg_x", timestamp, body)


@pytest.mark.parametrize(
    ("case", "mutate"),
    [
        ("tampered body", lambda h, b: (h, b + b" ")),
        ("wrong secret", lambda h, b: (_signed(b, int(h["webhook-timestamp"]), "other"), b)),
        ("stale timestamp", lambda h, b: (_signed(b, int(time.time()) - 301), b)),
        ("future timestamp", lambda h, b: (_signed(b, int(time.time()) + 301), b)),
        ("missing id", lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b)),
        ("other scheme", lambda h, b: ({**h, "webhook-signature": "v1a,AAAA"}, b)),
    ],
)
def test_verify_refuses_a_webhook_that_does_not_check_out(case: str, mutate: Any) -> None:
    """verify raises InvalidWebhook unless body, secret, time window and headers all check out."""
    body = b'{"type":"job.completed"}'
    headers, sent = mutate(_signed(body, int(time.time())), body)
    with pytest.raises(exceptions.InvalidWebhook):
        webhooks.verify(SECRET, headers, sent)


def test_verify_accepts_one_matching_signature_among_several() -> None:
    """During a secret rotation the header lists several signatures; one match is enough."""
    body = b'{"type":"job.failed"}'
    headers = _signed(body, int(time.time()))
    headers["webhook-signature"] = "v1,bm90IGl0 " + headers["webhook-signature"] + " v1a,eHl6"
    assert {"type": "job.failed"} == webhooks.verify(SECRET, headers, body)


def test_plain_secret_signs_with_its_utf8_bytes() -> None:
    """A secret without the whsec_ prefix is its UTF-8 bytes, i.e. whsec_ + base64 of them."""
    plain = "correct horse battery staple, long enough"
    spec_form = "whsec_" + base64.b64encode(plain.encode()).decode()
    assert webhooks.signing_key(spec_form) == webhooks.signing_key(plain)


# --- the SSRF guard (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "::127.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    """Private, loopback, link-local, multicast, unspecified (also inside IPv6) are refused."""
    assert webhooks.address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    """A public address, also IPv4-mapped, is not refused."""
    assert webhooks.address_refusal(ipaddress.ip_address(address)) is None


# --- retry decisions (pure) ------------------------------------------------------------


def test_retry_delay_ceiling_doubles_each_attempt() -> None:
    """With the jitter at its top, delays are base, 2*base, 4*base... up to the cap."""
    settings = Settings(webhook_retry_base_ms=1000, webhook_retry_max_ms=5000)
    delays = [
        webhooks.decide(
            n, status_code=500, error=None, age_s=0, settings=settings, rand=lambda: 1.0
        ).delay_s
        for n in range(1, 6)
    ]
    assert [1.0, 2.0, 4.0, 5.0, 5.0] == delays


def test_retry_waits_at_least_retry_after() -> None:
    """A receiver's Retry-After seconds lengthen the delay (within the cap)."""
    settings = Settings(webhook_retry_base_ms=100, webhook_retry_max_ms=60_000)
    outcome = webhooks.decide(
        1, status_code=503, error=None, age_s=0, settings=settings, retry_after=30
    )
    assert ("pending", 30.0) == (outcome.status, outcome.delay_s)


def test_delivery_gives_up_past_its_maximum_age() -> None:
    """A delivery whose next try would fall past WEBHOOK_MAX_AGE_S fails instead."""
    settings = Settings(webhook_max_age_s=60, webhook_retry_base_ms=10_000)
    outcome = webhooks.decide(
        1, status_code=500, error=None, age_s=59, settings=settings, rand=lambda: 0.5
    )
    assert "failed" == outcome.status


# --- the store queues deliveries -------------------------------------------------------


async def _store_with_job(path: Path, callback_url: str | None) -> tuple[Store, str]:
    store = SQLiteStore(path)
    await store.open()
    job_id = str(uuid.uuid4())
    await store.insert_job(
        NewJob(id=job_id, kind="download", payload={}, max_attempts=1, callback_url=callback_url)
    )
    await store.claim("w", lease_s=30, limit=1)
    return store, job_id


async def test_final_status_write_queues_the_delivery(tmp_path: Path) -> None:
    """Completing a job with a callback URL queues its delivery in that same write."""
    store, job_id = await _store_with_job(tmp_path / "db.sqlite3", "https://hooks.example/x")
    try:
        await store.complete(job_id, "w", {"key": "k"}, Progress(), ttl_s=60)
        rows = await store.webhook_deliveries_of(job_id)
    finally:
        await store.close()
    assert [("job.completed", "pending", "https://hooks.example/x")] == [
        (d.event_type, d.status, d.url) for d in rows
    ]


async def test_job_without_callback_queues_nothing(tmp_path: Path) -> None:
    """A job finished without a callback URL has no delivery."""
    store, job_id = await _store_with_job(tmp_path / "db.sqlite3", None)
    try:
        await store.fail(job_id, "w", {"code": "X"}, Progress(), ttl_s=60)
        rows = await store.webhook_deliveries_of(job_id)
    finally:
        await store.close()
    assert [] == rows


async def test_expiry_queues_no_second_delivery(tmp_path: Path) -> None:
    """A finished job expiring later does not send another event."""
    store, job_id = await _store_with_job(tmp_path / "db.sqlite3", "https://hooks.example/x")
    try:
        await store.cancel(job_id, ttl_s=0, message="Canceled")
        assert [job_id] == [job.id for job in await store.expire_due(limit=10)]
        rows = await store.webhook_deliveries_of(job_id)
    finally:
        await store.close()
    assert ["job.canceled"] == [d.event_type for d in rows]


# --- deliveries to a real receiver -----------------------------------------------------


async def test_completed_job_posts_a_signed_event(
    make_client: AppFactory, receiver: Receiver
) -> None:
    """A completed job's callback gets a job.completed event that verifies with the secret."""
    client = await make_client(**hook_settings())
    job_id = await initiate(client, [70000, 70007], callbackUrl=receiver.url)
    got = await acknowledged(receiver)
    event = webhooks.verify(SECRET, got.headers, got.body)
    assert ("job.completed", job_id, "completed") == (
        event["type"],
        event["data"]["jobId"],
        event["data"]["status"],
    )


async def test_delivery_verifies_with_the_reference_library(
    make_client: AppFactory, receiver: Receiver
) -> None:
    """The Standard Webhooks reference library accepts a delivery as it arrived."""
    client = await make_client(**hook_settings())
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    got = await acknowledged(receiver)
    event = Webhook(SECRET).verify(got.body.decode(), got.headers)
    assert job_id == event["data"]["jobId"]


async def test_event_data_is_the_job_resource_with_lasting_urls(
    make_client: AppFactory, receiver: Receiver
) -> None:
    """data is what the status route shows, with the result route instead of a signed URL."""
    public = "https://dl.example.test"
    client = await make_client(**hook_settings(), public_url=public)
    job_id = await initiate(client, [70000, 70007], callbackUrl=receiver.url)
    got = await acknowledged(receiver)
    shown = await (await client.get(f"/v1/download/status/{job_id}")).json()
    result_url = f"{public}/v1/download/{job_id}"
    expected = {
        **shown,
        "downloadUrl": result_url,
        "result": {**shown["result"], "url": result_url, "expiresAt": None},
        "links": {name: public + path for name, path in shown["links"].items()},
    }
    assert expected == got.event["data"]


async def test_event_timestamp_is_when_the_job_finished(
    make_client: AppFactory, receiver: Receiver
) -> None:
    """The event's timestamp is the job's finishedAt, the same on every attempt."""
    receiver.script = [500]
    client = await make_client(**hook_settings())
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    await acknowledged(receiver)
    job = await finished(client, job_id)
    stamps = [r.event["timestamp"] for r in receiver.requests]
    assert [job["timestamps"]["finishedAt"]] * 2 == stamps


async def test_failed_job_posts_job_failed(make_client: AppFactory, receiver: Receiver) -> None:
    """A job whose files are all missing sends job.failed with its error."""
    client = await make_client(**hook_settings())
    await initiate(client, [10001], callbackUrl=receiver.url)
    event = (await acknowledged(receiver)).event
    assert ("job.failed", "failed", "FILE_NOT_FOUND") == (
        event["type"],
        event["data"]["status"],
        event["data"]["error"]["code"],
    )


async def test_canceled_job_posts_job_canceled(make_client: AppFactory, receiver: Receiver) -> None:
    """Canceling a running job sends job.canceled."""
    client = await make_client(
        **hook_settings(),
        download_delay_enabled=True,
        download_delay_min_ms=60_000,
        download_delay_max_ms=60_000,
    )
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    response = await client.post(f"/v1/download/cancel/{job_id}")
    assert 200 == response.status
    event = (await acknowledged(receiver)).event
    assert ("job.canceled", "canceled") == (event["type"], event["data"]["status"])


async def test_failing_receiver_gets_retries_with_one_webhook_id(
    make_client: AppFactory, receiver: Receiver
) -> None:
    """A receiver answering 500 twice gets the event a third time, same webhook-id, then no more."""
    receiver.script = [500, 500]
    client = await make_client(**hook_settings())
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    delivery = await delivery_when(client, job_id, "delivered")
    assert ([500, 500, 204], {delivery.id}, 3) == (
        [r.answered for r in receiver.requests],
        {r.headers["webhook-id"] for r in receiver.requests},
        delivery.attempts,
    )


async def test_worker_counts_attempts(make_client: AppFactory, receiver: Receiver) -> None:
    """The worker's stats count one retry and one delivery for a receiver failing once."""
    receiver.script = [503]
    client = await make_client(**hook_settings())
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    await delivery_when(client, job_id, "delivered")
    stats = client.app[webhooks.WORKER].stats
    assert (2, 1, 1, 0) == (stats.attempts, stats.retries, stats.delivered, stats.failed)


async def test_delivery_fails_after_max_attempts(
    make_client: AppFactory, receiver: Receiver
) -> None:
    """A receiver that never succeeds gets WEBHOOK_MAX_ATTEMPTS requests, then it fails."""
    receiver.default = 500
    client = await make_client(**hook_settings(webhook_max_attempts=3))
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    delivery = await delivery_when(client, job_id, "failed")
    assert (3, 3) == (len(receiver.requests), delivery.attempts)


async def test_gone_receiver_stops_retries(make_client: AppFactory, receiver: Receiver) -> None:
    """A 410 Gone answer ends the delivery after that one request."""
    receiver.default = 410
    client = await make_client(**hook_settings(webhook_max_attempts=5))
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    delivery = await delivery_when(client, job_id, "failed")
    assert (1, 410) == (len(receiver.requests), delivery.last_status_code)


async def test_a_locked_database_is_a_warning_line_for_the_webhook_worker(
    make_client: AppFactory, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """While the database cannot be written (locked here; PostgreSQL restarting in a
    cluster), the webhook worker logs a warning line each time it tries, not an ERROR
    with a traceback every second; the delivery goes out once it is back."""
    receiver.default = 500
    client = await make_client(
        db_busy_timeout_ms=50,
        **hook_settings(webhook_retry_base_ms=200, webhook_retry_max_ms=200),
    )
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    await wait_for(lambda: _async(len(receiver.requests) >= 1))
    locker = sqlite3.connect(client.app[keys.SETTINGS].database_path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another process holding the write lock

        def failed_reads() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "webhook deliveries failed" in r.getMessage()]

        await wait_for(lambda: _async(failed_reads()))
        receiver.default = 204
    finally:
        locker.rollback()
        locker.close()
    await delivery_when(client, job_id, "delivered")

    assert {(logging.WARNING, None)} == {(r.levelno, r.exc_info) for r in failed_reads()}


async def test_a_delivery_cut_by_a_stop_goes_out_at_the_next_start(
    make_client: AppFactory, receiver: Receiver
) -> None:
    """A delivery in flight when its app stops (cut at the end of the shutdown grace)
    goes out as soon as the next app on the same data starts, not once its lease runs
    out (2 x WEBHOOK_TIMEOUT_S + 5 s, 25 s here): the stop leaves its worker's row gone,
    so no rescue would ever find the lease."""
    receiver.stall = asyncio.Event()
    first = await make_client(**hook_settings())
    job_id = await initiate(first, [70000], callbackUrl=receiver.url)
    await wait_for(lambda: _async(receiver.stalled == 1))
    await first.close()
    receiver.stall.set()

    second = await make_client(**hook_settings())

    delivery = await delivery_when(second, job_id, "delivered", timeout_s=10)
    assert [delivery.id] == [r.headers["webhook-id"] for r in receiver.acknowledged()]


async def test_restart_mid_retry_still_delivers(
    make_client: AppFactory, receiver: Receiver
) -> None:
    """A delivery still retrying when the app stops is sent by the next app on the same data."""
    receiver.default = 500
    slow_retries = hook_settings(
        webhook_retry_base_ms=100, webhook_retry_max_ms=200, webhook_max_attempts=100
    )
    first = await make_client(**slow_retries)
    job_id = await initiate(first, [70000], callbackUrl=receiver.url)
    await wait_for(lambda: _async(len(receiver.requests) >= 1))
    await first.close()
    receiver.default = 204
    second = await make_client(**slow_retries)
    delivery = await delivery_when(second, job_id, "delivered")
    assert (1, {delivery.id}) == (
        len(receiver.acknowledged()),
        {r.headers["webhook-id"] for r in receiver.requests},
    )


async def _async(value: Any) -> Any:
    return value


# --- secrets ---------------------------------------------------------------------------


async def test_generated_secret_is_kept_private(make_client: AppFactory, tmp_path: Path) -> None:
    """Without WEBHOOK_SECRET a whsec_ secret is generated into DATA_DIR, for the owner only."""
    await make_client(**hook_settings(webhook_secret=None))
    path = tmp_path / "data" / webhooks.SECRET_FILE
    assert (True, 0o600) == (
        path.read_text().startswith("whsec_"),
        stat.S_IMODE(path.stat().st_mode),
    )


async def test_deliveries_verify_with_the_generated_secret(
    make_client: AppFactory, receiver: Receiver, tmp_path: Path
) -> None:
    """Without WEBHOOK_SECRET, deliveries are signed with the secret written to DATA_DIR."""
    client = await make_client(**hook_settings(webhook_secret=None))
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    got = await acknowledged(receiver)
    secret = (tmp_path / "data" / webhooks.SECRET_FILE).read_text().strip()
    assert job_id == Webhook(secret).verify(got.body.decode(), got.headers)["data"]["jobId"]


async def test_plain_secret_deliveries_verify(make_client: AppFactory, receiver: Receiver) -> None:
    """A plain WEBHOOK_SECRET signs deliveries that verify with that same string."""
    plain = "a plain passphrase of at least 24 bytes"
    client = await make_client(**hook_settings(webhook_secret=plain))
    job_id = await initiate(client, [70000], callbackUrl=receiver.url)
    got = await acknowledged(receiver)
    assert job_id == webhooks.verify(plain, got.headers, got.body)["data"]["jobId"]


# --- the SSRF guard at initiate and at delivery ----------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost:8080/hook",
        "http://LOCALHOST./hook",
        "http://api.localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10:8000/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fe80::1]/hook",
        "http://2130706433/hook",
    ],
)
async def test_private_callback_is_refused_at_initiate(make_client: AppFactory, url: str) -> None:
    """A callbackUrl on a loopback, private or link-local host gets 400 and creates no job."""
    client = await make_client()
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": [70000], "callbackUrl": url}
    )
    problem = await response.json()
    counts = await client.app[keys.STORE].count_by_status()
    assert (400, "application/problem+json", ["callbackUrl"], 0) == (
        response.status,
        response.content_type,
        [e["field"] for e in problem["errors"]],
        sum(counts.values()),
    )


async def test_name_resolving_to_loopback_is_refused_at_initiate(
    make_client: AppFactory,
) -> None:
    """A host name that resolves to a non-public address gets 400."""
    name = loopback_name()
    client = await make_client()
    response = await client.post(
        "/v1/download/initiate",
        json={"file_ids": [70000], "callbackUrl": f"http://{name}:9/hook"},
    )
    assert 400 == response.status


async def test_allow_listed_host_is_accepted(make_client: AppFactory) -> None:
    """A loopback host in WEBHOOK_ALLOW_HOSTS is accepted as a callback."""
    client = await make_client(webhook_allow_hosts=["127.0.0.1"])
    response = await client.post(
        "/v1/download/initiate",
        json={"file_ids": [70000], "callbackUrl": "http://127.0.0.1:9/hook"},
    )
    assert 202 == response.status


async def test_allow_list_does_not_open_other_hosts(make_client: AppFactory) -> None:
    """Allow-listing one private host leaves the others refused."""
    client = await make_client(webhook_allow_hosts=["127.0.0.1"])
    response = await client.post(
        "/v1/download/initiate",
        json={"file_ids": [70000], "callbackUrl": "http://127.0.0.2:9/hook"},
    )
    assert 400 == response.status


@pytest.mark.parametrize("target", ["address", "name"])
async def test_delivery_to_a_host_no_longer_allowed_sends_nothing(
    make_client: AppFactory, receiver: Receiver, target: str
) -> None:
    """After a restart without the allow-list, the delivery is marked failed without a request."""
    host = "127.0.0.1" if target == "address" else loopback_name()
    url = receiver.url.replace("127.0.0.1", host)
    first = await make_client(
        **hook_settings(webhook_allow_hosts=[host]),
        download_delay_enabled=True,
        download_delay_min_ms=60_000,
        download_delay_max_ms=60_000,
    )
    job_id = await initiate(first, [70000], callbackUrl=url)
    await first.close()  # the running job goes back to the queue
    second = await make_client(**hook_settings(webhook_allow_hosts=[]))
    delivery = await delivery_when(second, job_id, "failed")
    assert (0, 0, True) == (
        len(receiver.requests),
        delivery.attempts,
        "refused" in (delivery.last_error or ""),
    )


# --- a real `longdl serve` killed with SIGKILL -----------------------------------------


@contextlib.asynccontextmanager
async def serve(env: dict[str, str], log_path: Path) -> AsyncIterator[ServiceProcess]:
    """Run ``longdl serve`` with the settings ``env`` until it answers /health; kill it
    on exit."""
    service = ServiceProcess(Path(env["DATA_DIR"]), env, log_path=log_path)
    await service.start(timeout_s=30)
    try:
        yield service
    finally:
        service.close()


def seeded_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The settings of a ``longdl serve`` posting webhooks to the loopback receiver, with
    source file 70000 seeded in its DATA_DIR."""
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "WEBHOOK_SECRET": SECRET,
        **settings,
    }
    ServiceProcess(tmp_path / "data", env).run_cli("seed", "70000")
    return env


def assert_delivered_once(receiver: Receiver, got: Received, job_id: str) -> None:
    """``got`` is a genuine job.completed event of ``job_id``, and the receiver saw one
    delivery (one webhook-id), however many attempts it took."""
    event = webhooks.verify(SECRET, got.headers, got.body)
    assert (job_id, "job.completed", 1) == (
        event["data"]["jobId"],
        event["type"],
        len({r.headers["webhook-id"] for r in receiver.requests}),
    )


async def initiate_with_callback(
    session: aiohttp.ClientSession, service: ServiceProcess, receiver: Receiver
) -> str:
    """Start a job on ``service`` whose webhook goes to ``receiver``; its id."""
    async with session.post(
        f"{service.url}/v1/download/initiate",
        json={"file_ids": [70000], "callbackUrl": receiver.url},
    ) as response:
        return str((await response.json())["jobId"])


@pytest.mark.slow
async def test_sigkill_after_finish_still_delivers(receiver: Receiver, tmp_path: Path) -> None:
    """A service killed by SIGKILL right after a job finished delivers once restarted."""
    receiver.default = 503  # nothing is acknowledged before the kill
    env = seeded_env(
        tmp_path,
        WEBHOOK_RETRY_BASE_MS="50",
        WEBHOOK_RETRY_MAX_MS="200",
        WEBHOOK_MAX_ATTEMPTS="100",
    )
    log_path = tmp_path / "serve.log"
    async with aiohttp.ClientSession() as session:
        async with serve(env, log_path) as service:
            job_id = await initiate_with_callback(session, service, receiver)

            async def completed() -> bool:
                url = f"{service.url}/v1/download/status/{job_id}"
                async with session.get(url) as response:
                    return bool((await response.json())["status"] == "completed")

            await wait_for(completed, timeout_s=30)
            service.kill()
        receiver.default = 204
        async with serve(env, log_path):
            got = await acknowledged(receiver, timeout_s=30)
    assert_delivered_once(receiver, got, job_id)


@pytest.mark.slow
async def test_sigkill_mid_delivery_delivers_at_restart_not_a_lease_later(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A delivery in flight when its service is killed is handed out again as soon as the
    service is back (its worker's lock is free), not when its lease (twice
    WEBHOOK_TIMEOUT_S, here 125 s) runs out."""
    receiver.stall = asyncio.Event()
    env = seeded_env(tmp_path, WEBHOOK_TIMEOUT_S="60")
    log_path = tmp_path / "serve.log"
    async with aiohttp.ClientSession() as session:
        async with serve(env, log_path) as service:
            job_id = await initiate_with_callback(session, service, receiver)

            async def in_flight() -> bool:
                return receiver.stalled == 1

            await wait_for(in_flight, timeout_s=30)
            service.kill()
        receiver.stall.set()
        async with serve(env, log_path):
            got = await acknowledged(receiver, timeout_s=15)
    assert_delivered_once(receiver, got, job_id)


@pytest.mark.slow
async def test_a_peer_killed_mid_delivery_is_taken_over_by_the_survivor(
    receiver: Receiver, tmp_path: Path
) -> None:
    """Two services share one DATA_DIR. One is killed while its delivery is stalled at the
    receiver; the survivor, whose webhook worker is asleep until that delivery's lease
    runs out (125 s here), delivers it once its own rescue finds the dead peer (LEASE_S=3:
    a rescue a second), not when the lease runs out."""
    receiver.stall = asyncio.Event()
    env = seeded_env(tmp_path, WEBHOOK_TIMEOUT_S="60", LEASE_S="3")
    async with (
        aiohttp.ClientSession() as session,
        serve(env, tmp_path / "doomed.log") as doomed,
    ):
        job_id = await initiate_with_callback(session, doomed, receiver)

        async def in_flight() -> bool:
            return receiver.stalled == 1

        await wait_for(in_flight, timeout_s=30)
        async with serve(env, tmp_path / "survivor.log"):
            doomed.kill()
            receiver.stall.set()
            got = await acknowledged(receiver, timeout_s=20)
    assert_delivered_once(receiver, got, job_id)
