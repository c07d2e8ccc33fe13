"""Odd bytes from clients: signatures, keys, headers and cursors no HTTP library would
send. Each gets a 4xx problem, changes nothing, and leaves no traceback in the log."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import socket
import sqlite3
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import rawhttp
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate, wait_for
from prometheus_client.parser import text_string_to_metric_families
from service import ServiceProcess

from longdl import exceptions
from longdl.engine import Artifact, JobContext
from longdl.models import Job
from longdl.web import keys

KEYS = {"api_keys": ["alice:alice-key-0123456789"]}


def job_count(client: TestClient[Any, Any]) -> int:
    with sqlite3.connect(client.app[keys.SETTINGS].database_path) as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


async def send(
    client: TestClient[Any, Any],
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> rawhttp.RawResponse:
    assert client.server.port is not None
    return await rawhttp.send(
        client.server.port, rawhttp.build(method, target, headers or [], body)
    )


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert [] == [r.getMessage() for r in logged]


async def signed_file_query(client: TestClient[Any, Any]) -> tuple[bytes, bytes]:
    """The path and query of a real signed URL to a completed job's file."""
    body = await finished(client, await initiate(client, [70000]))
    path, _, query = body["downloadUrl"].partition("?")
    return path[path.index("/files/") :].encode(), query.encode()


# Percent-encoded: raw bytes in a URL are refused by aiohttp's HTTP parser itself (the
# header fuzz of a real `longdl serve` sends those).
@pytest.mark.parametrize("signature", [b"%C3%A9" * 32, b"%FF%FE", b"%ED%A0%80", b"%00"])
async def test_a_non_ascii_signature_is_403(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, signature: bytes
) -> None:
    """/files with a sig that is not ASCII (or not UTF-8) is a 403 problem, not a 500."""
    path, query = await signed_file_query(client)
    forged = b"&".join(p for p in query.split(b"&") if not p.startswith(b"sig=")) + b"&sig="

    response = await send(client, "GET", path + b"?" + forged + signature)

    assert 403 == response.status
    assert "INVALID_SIGNATURE" == response.json()["code"]
    assert_no_traceback(caplog)


async def test_an_undecodable_filename_or_huge_expiry_is_403(client: TestClient[Any, Any]) -> None:
    """A filename that is not UTF-8 or a 5,000-digit expiry cannot match any signature."""
    path, query = await signed_file_query(client)
    params = dict(p.split(b"=", 1) for p in query.split(b"&"))
    for name, value in ((b"filename", b"%FF%FE.zip"), (b"expires", b"9" * 5000)):
        tampered = b"&".join(k + b"=" + (value if k == name else v) for k, v in params.items())
        response = await send(client, "GET", path + b"?" + tampered)
        assert 403 == response.status, (name, response.body)


@pytest.mark.parametrize(
    "token", [b"\xff\xfe", b"\xc3\xa9", b"alice-key-0123456789\xff", b"\xed\xa0\x80"]
)
async def test_a_bearer_token_that_is_not_utf8_is_401(
    make_client: AppFactory, caplog: pytest.LogCaptureFixture, token: bytes
) -> None:
    """A Bearer token of arbitrary bytes is a 401 problem (logged in one line)."""
    client = await make_client(**KEYS)
    caplog.set_level(logging.INFO, "longdl.web")

    response = await send(
        client, "GET", b"/v1/download/history", [(b"Authorization", b"Bearer " + token)]
    )

    assert 401 == response.status
    assert "UNAUTHORIZED" == response.json()["code"]
    assert "bearer" in response.headers["www-authenticate"].lower()
    assert_no_traceback(caplog)
    assert any("auth.refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "key", [b"\xff\xfe", b"caf\xc3\xa9", b"tab\there", b"zero\xe2\x80\x8bwidth"]
)
async def test_an_idempotency_key_that_is_not_printable_ascii_is_400(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, key: bytes
) -> None:
    """An Idempotency-Key with bytes beyond printable ASCII is a 400 and makes no job."""
    response = await send(
        client,
        "POST",
        b"/v1/download/initiate",
        [(b"Content-Type", b"application/json"), (b"Idempotency-Key", key)],
        b'{"file_ids":[70000]}',
    )

    assert 400 == response.status
    assert "VALIDATION_ERROR" == response.json()["code"]
    assert 0 == job_count(client)
    assert_no_traceback(caplog)


async def test_two_idempotency_keys_are_400(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Two Idempotency-Key lines: which one keys the job would be a guess (the first was
    taken, and a retry sent through a proxy that kept the other made a second job)."""
    response = await send(
        client,
        "POST",
        b"/v1/download/initiate",
        [
            (b"Content-Type", b"application/json"),
            (b"Idempotency-Key", b"key-one"),
            (b"Idempotency-Key", b"key-two"),
        ],
        b'{"file_ids":[70000]}',
    )

    assert 400 == response.status
    assert "Idempotency-Key" in response.json()["detail"]
    assert 0 == job_count(client)
    assert_no_traceback(caplog)


async def test_two_authorization_headers_are_400(
    make_client: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Two Authorization lines, the first a valid key: refused, not authorized by the
    first (a proxy in front may have checked the other)."""
    client = await make_client(**KEYS)
    good, bad = b"Bearer alice-key-0123456789", b"Bearer not-a-key"
    for pair in ((good, bad), (bad, good)):
        response = await send(
            client,
            "GET",
            b"/v1/download/history",
            [(b"Authorization", pair[0]), (b"Authorization", pair[1])],
        )
        assert 400 == response.status, response.body
        assert "Authorization" in response.json()["detail"]
    one = await send(client, "GET", b"/v1/download/history", [(b"Authorization", good)])
    assert 200 == one.status
    assert_no_traceback(caplog)


@pytest.mark.parametrize(
    "codings",
    [[b"foo"], [b"compress"], [b"gzip, gzip"], [b"identity", b"foo"]],
    ids=["unknown", "compress", "a list", "twice"],
)
async def test_a_content_coding_not_decoded_here_is_415(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, codings: list[bytes]
) -> None:
    """A body in a coding aiohttp does not decode reached the handler as it came (plain
    JSON labelled ``foo`` made a job): now a 415 naming the codings taken, and no job."""
    response = await send(
        client,
        "POST",
        b"/v1/download/initiate",
        [(b"Content-Type", b"application/json")]
        + [(b"Content-Encoding", coding) for coding in codings],
        b'{"file_ids":[70000]}',
    )

    assert 415 == response.status
    assert "UNSUPPORTED_MEDIA_TYPE" == response.json()["code"]
    assert {"gzip", "deflate"} <= {
        c.strip() for c in response.headers["accept-encoding"].split(",")
    }
    assert 0 == job_count(client)
    assert_no_traceback(caplog)


async def test_a_gzip_or_identity_body_is_taken(client: TestClient[Any, Any]) -> None:
    """The codings aiohttp decodes still work: gzip and identity (any case)."""
    body = b'{"file_ids":[70000]}'
    for coding, sent in ((b"GZIP", gzip.compress(body)), (b"identity", body)):
        response = await send(
            client,
            "POST",
            b"/v1/download/initiate",
            [(b"Content-Type", b"application/json"), (b"Content-Encoding", coding)],
            sent,
        )
        assert 202 == response.status, (coding, response.body)
    assert 2 == job_count(client)


@pytest.mark.parametrize("wait", ["٣", "1_0", "-1", "nan"])
async def test_a_wait_in_other_digits_is_400(client: TestClient[Any, Any], wait: str) -> None:
    """?wait= in ASCII only: Arabic-Indic digits and underscores were read as numbers."""
    job_id = await initiate(client, [70000])

    response = await client.get(f"/v1/download/status/{job_id}", params={"wait": wait})

    assert 400 == response.status
    assert "wait" in (await response.json())["detail"]


async def test_a_prefer_wait_in_other_digits_is_ignored(client: TestClient[Any, Any]) -> None:
    """``Prefer: wait=٣`` is a malformed preference: ignored (RFC 7240), so no wait and
    no Preference-Applied."""
    response = await client.post(
        "/v1/download/initiate",
        json={"file_ids": [70000]},
        headers={"Prefer": "wait=٣"},
    )

    assert 202 == response.status
    assert "Preference-Applied" not in response.headers


@pytest.mark.parametrize("request_id", [b"caf\xc3\xa9", b"\xff\xfe", "١٢٣".encode()])
async def test_a_request_id_that_is_not_ascii_is_replaced(
    client: TestClient[Any, Any], request_id: bytes
) -> None:
    """Only ASCII request ids are echoed; anything else gets a fresh UUID."""
    response = await send(client, "GET", b"/health", [(b"X-Request-ID", request_id)])

    assert 200 == response.status
    uuid.UUID(response.headers["x-request-id"])


@pytest.mark.parametrize(
    "header",
    [
        (b"Prefer", b"wait=\xff\xfe, respond-async\xc3"),
        (b"Prefer", b"wait=1e999"),
        (b"Last-Event-ID", b"\xff\xfe"),
        (b"If-None-Match", b'"\xff\xfe"'),
    ],
)
async def test_other_headers_of_odd_bytes_are_ignored_or_refused(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, header: tuple[bytes, bytes]
) -> None:
    """Prefer, Last-Event-ID and If-None-Match of any bytes: a 2xx/304 or a 400, never 5xx."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)
    targets = [
        ("POST", b"/v1/download/initiate"),
        ("GET", f"/v1/download/status/{job_id}".encode()),
        ("GET", f"/v1/download/{job_id}/events".encode()),
    ]
    for method, target in targets:
        response = await send(
            client,
            method,
            target,
            [header, (b"Content-Type", b"application/json")],
            b'{"file_ids":[70000]}' if method == "POST" else b"",
        )
        assert response.status in (200, 202, 304, 400), (target, response.status, response.body)
    assert_no_traceback(caplog)


def cursor_of(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


@pytest.mark.parametrize(
    "cursor",
    [
        b"1e999_6f1c8e2a-0000-4000-8000-000000000000",
        b"nan_6f1c8e2a-0000-4000-8000-000000000000",
        b"1_" + b"x" * 36,
        b"9" * 400 + b"_6f1c8e2a-0000-4000-8000-000000000000",
        cursor_of(b'[1, "6f1c8e2a-0000-4000-8000-000000000000"]'),
        b"%FF%FE",
        b"%C3%A9",
    ],
    ids=["infinite", "nan", "not a uuid", "huge", "base64 json", "not utf-8", "not ascii"],
)
async def test_a_forged_history_cursor_is_400(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, cursor: bytes
) -> None:
    """A cursor the service did not mint is a 400 problem, whatever it decodes to."""
    response = await send(client, "GET", b"/v1/download/history?cursor=" + cursor)

    assert 400 == response.status, response.body
    assert_no_traceback(caplog)


@pytest.fixture(params=["sqlite", "postgres"])
def on_either_store(request: pytest.FixtureRequest, make_client: AppFactory) -> AppFactory:
    """``make_client`` on SQLite, or on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return make_client
    postgres = request.getfixturevalue("postgres")  # started once per session

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        secret = "s" * 32  # replicas must share their secrets
        url = await postgres.new_database()
        return await make_client(
            database_url=url, signing_secret=secret, webhook_secret=secret, **overrides
        )

    return make


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/download/status/%FF%FE",
        b"/v1/download/%C3%A9",
        b"/v1/download/%C3%A9/events",
        b"/v1/download/status/" + b"%D9%A0" * 32,  # Arabic-Indic zeros: int() takes them
        b"/files/downloads/70000.zip%0A",
        b"/files/%ED%A0%80?expires=1&filename=a&sig=b",
        b"/v1/download/history?userId=%ED%A0%80&status=%FF",
        b"/docs/assets/%2E%2E%2Fsecret",
        b"/v1/download/status/%00",
        b"/v1/download/status/" + b"0" * 8 + b"-0000-4000-8000-00000000000%00",
        b"/v1/download/%00/events",
        b"/v1/download/%00",
        b"/v1/download/history?cursor=%00",
    ],
)
async def test_odd_path_parameters_are_404_or_400(
    on_either_store: AppFactory, caplog: pytest.LogCaptureFixture, target: bytes
) -> None:
    """Job ids, object keys and queries of odd bytes (NUL, which PostgreSQL's text cannot
    hold, too) are refused as 4xx problems on either store."""
    client = await on_either_store()
    response = await send(client, "GET", target)

    assert 400 <= response.status < 500, response.body
    assert_no_traceback(caplog)


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("POST", "/v1/download/initiate", {"file_ids": [70000], "userId": "a\x00b"}),
        ("POST", "/v1/download/initiate", {"file_ids": [70000], "clientRequestId": "k\x00"}),
        ("GET", "/v1/download/history?userId=a%00b", None),
    ],
)
async def test_text_with_a_nul_character_is_400_on_either_store(
    on_either_store: AppFactory,
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    body: dict[str, Any] | None,
) -> None:
    """A NUL character in a name the client chooses (userId, clientRequestId) is a 400
    problem naming the field, on SQLite as on PostgreSQL (whose text cannot hold it), and
    makes no job."""
    client = await on_either_store()
    response = await client.request(method, target, json=body)

    assert 400 == response.status
    problem = await response.json()
    assert "VALIDATION_ERROR" == problem["code"]
    assert [("must not contain NUL characters")] == [e["message"] for e in problem["errors"]]
    store = client.app[keys.STORE]
    assert 0 == sum((await store.count_by_status()).values())
    assert_no_traceback(caplog)


async def test_a_job_saying_nul_characters_finishes_on_either_store(
    on_either_store: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's progress and failure text holding NUL characters (PostgreSQL's jsonb
    cannot store them) is kept with U+FFFD in their place: its progress is written, its
    final write lands instead of being retried for ever, and a job beside it completes."""
    go = asyncio.Event()

    async def odd(ctx: JobContext) -> Artifact:
        ctx.report(percent=50, message="half\x00way")
        await go.wait()
        raise exceptions.JobFailed("ODD", "upstream said \x00")

    client = await on_either_store(handlers={"odd": odd})
    store = client.app[keys.STORE]
    odd_id = (await client.app[keys.ENGINE].submit("odd", {})).job.id

    async def stored(job_id: str, done: bool) -> Job | None:
        job = await store.get_job(job_id)
        if job is None or job.status.finished != done:
            return None
        return job if done or job.progress.percent == 50 else None

    assert "half\ufffdway" == (await wait_for(lambda: stored(odd_id, False))).progress.message
    go.set()
    plain_id = await initiate(client, [70000])
    # The status route shows an outcome while its write is still landing: wait for the store.
    plain = await wait_for(lambda: stored(plain_id, True))
    job = await wait_for(lambda: stored(odd_id, True))
    assert ("failed", "upstream said \ufffd") == (job.status.value, job.error["message"])
    assert "completed" == plain.status
    assert_no_traceback(caplog)


# --- requests cut short, odd hosts and names (found by probing a real serve) ----------


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A real ``longdl serve`` (test servers cancel the handler of a client that leaves,
    where a serve does not: what such a client does to a serve is seen only there)."""
    service = ServiceProcess(tmp_path / "data")
    service.run_cli("seed", "70000")
    await service.start()
    try:
        yield service
    finally:
        service.close()


async def answered(service: ServiceProcess, method: str, route: str) -> dict[str, float]:
    """How many ``method`` requests to ``route`` the service answered, by status (its
    metrics)."""
    async with aiohttp.ClientSession() as session, session.get(service.url + "/metrics") as got:
        text = await got.text()
    return {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "longdl_http_request_duration_seconds_count"
        and (sample.labels["method"], sample.labels["route"]) == (method, route)
    }


async def cut_short(port: int, request: bytes, read_first: bool) -> None:
    """Send ``request``, maybe read the server's first answer line, then reset the
    connection (SO_LINGER 0: an RST, as a client killed mid-request sends)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    if read_first:
        await asyncio.wait_for(reader.readline(), 10)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def assert_quiet(service: ServiceProcess) -> None:
    """The serve stops cleanly, having logged nothing at ERROR and no traceback."""
    assert 0 == service.terminate()
    log = service.log()
    assert 0 == log.count("Traceback"), log
    assert " ERROR " not in log, log


async def post_when_read(port: int, head: bytes, body: bytes) -> rawhttp.RawResponse:
    """Send a request's ``head`` (which asks for 100 Continue), and its ``body`` once the
    handler reads it; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        writer.write(body)
        return rawhttp.parse(await asyncio.wait_for(reader.read(), 10))
    finally:
        writer.close()


async def test_a_body_that_is_not_in_its_content_encoding_is_400(served: ServiceProcess) -> None:
    """A plain JSON body sent as gzip, arriving once the handler reads it, is a 400
    problem (it was a 500), creates no job and leaves no traceback, only one INFO line.
    (Sent with its head, aiohttp's parser refuses it before any handler: its own
    one-line 400.)"""
    body = b'{"file_ids": [70000]}'
    head = (
        b"POST /v1/download/initiate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )

    response = await post_when_read(served.port, head, body)

    assert 400 == response.status, response.body
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "Content-Encoding" in response.json()["detail"]
    assert [] == (await served.json("GET", "/v1/download/history"))[1]["items"]
    assert_quiet(served)


@pytest.mark.parametrize("expect_continue", [False, True], ids=["body", "100-continue"])
async def test_a_client_leaving_mid_body_is_a_400_not_an_error(
    served: ServiceProcess, expect_continue: bool
) -> None:
    """A client that sends part of its body (or waits for 100 Continue) and goes: the
    request ends as a 400, creating nothing (it was a 500 with a traceback)."""
    head = [
        b"POST /v1/download/initiate HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        b"Content-Length: 100",
    ]
    if expect_continue:
        head.append(b"Expect: 100-continue")
    request = b"\r\n".join(head) + b"\r\n\r\n" + (b"" if expect_continue else b'{"file_ids"')

    await cut_short(served.port, request, read_first=expect_continue)

    statuses = await wait_for(lambda: answered(served, "POST", "/v1/download/initiate"))
    assert {"400": 1.0} == statuses
    assert [] == (await served.json("GET", "/v1/download/history"))[1]["items"]
    assert_quiet(served)


async def test_a_stream_client_gone_before_the_head_is_not_an_error(
    served: ServiceProcess,
) -> None:
    """Event-stream clients that reset their connection at once: each stream ends
    quietly (the failed head raised out of the handler: a 500 and a traceback)."""
    status, job = await served.json("POST", "/v1/download/initiate", json={"file_ids": [70000]})
    assert 202 == status, job
    request = f"GET {job['eventsUrl']} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    for _ in range(5):
        await cut_short(served.port, request, read_first=False)

    async def all_answered() -> dict[str, float] | None:
        statuses = await answered(served, "GET", "/v1/download/{job_id}/events")
        return statuses if sum(statuses.values()) >= 5 else None

    assert "500" not in await wait_for(all_answered)
    assert_quiet(served)


async def test_head_of_an_event_stream_has_no_body(client: TestClient[Any, Any]) -> None:
    """HEAD on the events route answers the stream's head alone; the next response on
    the connection is not taken for events (they used to follow a HEAD's head)."""
    job_id = await initiate(client, [70000])
    await finished(client, job_id)
    events = f"/v1/download/{job_id}/events".encode()
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"HEAD " + events + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()

    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    assert b"content-type: text/event-stream" in head.lower()
    assert rest.startswith(b"HTTP/1.1 200"), rest[:300]
    assert b'"healthy"' in rest
    missing = await send(client, "HEAD", b"/v1/download/" + str(uuid.uuid4()).encode() + b"/events")
    assert 404 == missing.status


@pytest.mark.parametrize("host", [b"a:b:c", b"x\x80y", b"ok.example:99999"])
async def test_a_start_with_a_host_that_is_not_one_is_400_and_starts_nothing(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, host: bytes
) -> None:
    """/start builds its download URL from the Host: one that is no host is refused
    before any job starts (it was a 500 once the job had run)."""
    body = b'{"file_id": 70000}'
    request = (
        b"POST /v1/download/start HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    assert client.server.port is not None

    response = await rawhttp.send(client.server.port, request)

    assert 400 == response.status, response.body
    assert "Host" in response.json()["detail"]
    assert 0 == job_count(client)
    assert_no_traceback(caplog)


@pytest.mark.parametrize(
    "authority", ["a" * 64 + ".example.com", "a..example.com", "example.com:0"]
)
async def test_a_callback_host_that_is_no_dns_name_is_400(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, authority: str
) -> None:
    """A callback URL whose host has a label over 63 characters (or an empty one) is a
    400 on callbackUrl, not a 500 from the resolver; so is one on port 0, which no
    delivery could reach."""
    response = await client.post(
        "/v1/download/initiate",
        json={"file_ids": [70000], "callbackUrl": f"http://{authority}/"},
    )

    assert 400 == response.status, await response.text()
    assert ["callbackUrl"] == [e["field"] for e in (await response.json())["errors"]]
    assert 0 == job_count(client)
    assert_no_traceback(caplog)


async def test_a_ui_file_name_too_long_for_the_filesystem_is_404(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """/ui/<300 characters>.js is a 404 problem (the filesystem's ENAMETOOLONG was a 500)."""
    response = await client.get("/ui/" + "a" * 300 + ".js")

    assert 404 == response.status
    assert "application/problem+json" == response.content_type
    assert_no_traceback(caplog)
