"""Odd bytes from clients: signatures, keys, headers and cursors no HTTP library would
send. Each gets a 4xx problem, changes nothing, and leaves no traceback in the log."""

from __future__ import annotations

import asyncio
import base64
import logging
import sqlite3
import uuid
from typing import Any

import pytest
import rawhttp
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate, wait_for

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
