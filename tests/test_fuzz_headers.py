"""Header and query fuzz against a real ``longdl serve``: every documented route, random
bytes in every header the service reads and in the query string. Nothing a client sends
may cause a 5xx or a traceback.

The seed is fixed (``FUZZ_SEED`` overrides it) so a failure replays; the failing
request is printed.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
import rawhttp
from conftest import wait_for
from service import ServiceProcess

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("FUZZ_SEED", "11"))
#: Requests per mode (open, API keys): 2 x 1,200 in all.
REQUESTS = 1200
CONCURRENCY = 8
KEY = "fuzz-key-0123456789"

#: The headers the service reads, each fuzzed on its own (issue 11) plus a few more.
FUZZED_HEADERS = (
    b"Idempotency-Key",
    b"Prefer",
    b"Last-Event-ID",
    b"If-None-Match",
    b"X-Request-ID",
    b"Authorization",
    b"Origin",
    b"Referer",
    b"Range",
    b"X-Forwarded-For",
)
#: Query parameters some route reads, plus made-up ones.
QUERY_NAMES = (
    b"wait",
    b"redirect",
    b"userId",
    b"status",
    b"limit",
    b"cursor",
    b"lastEventId",
    b"expires",
    b"filename",
    b"sig",
    b"x",
)
BODIES = {
    "/v1/download/initiate": b'{"file_ids":[70000,70007]}',
    "/v1/download/start": b'{"file_id":70000}',
    "/v1/download/check": b'{"file_id":70000}',
}
#: Settings that let the requests reach the code instead of a limit.
SERVICE_SETTINGS = {
    "RATE_LIMIT_MAX_REQUESTS": "1000000",
    "RATE_LIMIT_POLL_MAX_REQUESTS": "1000000",
    "RATE_LIMIT_AUTH_FAILURES": "1000000",
    "MAX_ACTIVE_PER_USER": "100000",
    "SYNC_WAIT_MAX_S": "2",
    "LONG_POLL_MAX_S": "2",
    "SSE_MAX_S": "2",
    "SHUTDOWN_GRACE_S": "0",
}


#: Bytes a header value may hold (RFC 9110 field-vchar, SP and HTAB, obs-text).
HEADER_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]


def junk(rng: random.Random) -> bytes:
    """Up to 40 bytes of one of several kinds of nonsense (never CR or LF, which would
    end the header line; control bytes now and then)."""
    size = rng.randrange(0, 40)
    kind = rng.randrange(6)
    if kind == 0:  # printable ASCII
        return bytes(rng.randrange(0x20, 0x7F) for _ in range(size))
    if kind == 1:  # high bytes: not UTF-8
        return bytes(rng.randrange(0x80, 0x100) for _ in range(size))
    if kind == 2:  # valid UTF-8 from all over Unicode (no surrogates)
        chars = [chr(rng.choice([rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)]))]
        return "".join(chars * max(1, size // 4)).encode()
    if kind == 3:  # any byte a header line may hold, tabs included
        return bytes(rng.choice(HEADER_BYTES) for _ in range(size))
    if kind == 4:  # near-miss values of the headers' own grammars
        return rng.choice(
            [
                b"wait=" + str(rng.choice([-1, 0, 1, 1e309, 2**70])).encode(),
                b"respond-async, wait=\xff",
                b'W/"' + bytes(rng.randrange(0x80, 0x100) for _ in range(8)) + b'"',
                b"Bearer " + bytes(rng.randrange(0x80, 0x100) for _ in range(size)),
                b"Bearer " + KEY.encode() + b"\xc3\xa9",
                b"bytes=" + str(rng.randrange(-5, 10**6)).encode() + b"-",
                b"9" * rng.randrange(1, 5000),
                b"http://localhost\xff:3000",
                b"\xed\xa0\x80",  # an encoded surrogate: not valid UTF-8
            ]
        )
    if rng.random() < 0.1:  # control bytes (NUL, ESC, ...): the HTTP parser's to refuse
        return bytes(b for b in (rng.randrange(0, 0x100) for _ in range(size)) if b not in b"\r\n")
    return b""


def path_param(rng: random.Random, real: str) -> bytes:
    choice = rng.random()
    if choice < 0.35:
        return real.encode()
    if choice < 0.55:
        return str(uuid.uuid4()).encode()
    if choice < 0.9:
        return quote_from_bytes(junk(rng), safe=b"").encode()
    return bytes(b for b in junk(rng) if b > 0x20 and b not in b"/?#%")  # raw bytes


def query(rng: random.Random) -> bytes:
    pairs = []
    for _ in range(rng.randrange(0, 4)):
        name = rng.choice(QUERY_NAMES)
        value = junk(rng)
        # Mostly percent-encoded (it reaches the handlers), sometimes raw bytes.
        if rng.random() < 0.9:
            value = quote_from_bytes(value, safe=b"").encode()
        else:
            value = bytes(b for b in value if b > 0x20 and b not in b"#&")
        pairs.append(name + b"=" + value)
    return b"?" + b"&".join(pairs) if pairs else b""


def fuzzed_requests(
    rng: random.Random, operations: list[tuple[str, str]], job_id: str, file_query: str
) -> Iterator[tuple[str, bytes]]:
    """(description, raw request) pairs, one route each, round robin over the routes."""
    i = 0
    while True:
        method, template = operations[i % len(operations)]
        i += 1
        target = re.sub(
            r"\{(\w+)\}",
            lambda m: path_param(
                rng,
                {"job_id": job_id, "key": "downloads/70000.zip", "name": "swagger-ui.css"}.get(
                    m.group(1), "x"
                ),
            ).decode("latin-1"),
            template,
        ).encode("latin-1")
        target += query(rng) if template != "/files/{key}" or rng.random() < 0.5 else b""
        if template == "/files/{key}" and b"?" not in target:
            target += b"?" + file_query.encode()
        headers: list[tuple[bytes, bytes]] = []
        if rng.random() < 0.7:
            headers.append((b"Authorization", b"Bearer " + KEY.encode()))
        for name in FUZZED_HEADERS:
            if rng.random() < 0.35:
                headers.append((name, junk(rng)))
        body = b""
        if method == "POST":
            body = BODIES.get(template, b"") if rng.random() < 0.8 else junk(rng)
            headers.append((b"Content-Type", b"application/json"))
        yield (f"{method} {target!r} {headers!r}", rawhttp.build(method, target, headers, body))


@pytest.mark.parametrize("mode", ["open", "api_keys"])
async def test_no_header_or_query_bytes_cause_a_5xx_or_a_traceback(
    tmp_path: Path, mode: str
) -> None:
    """1,200 requests of random header and query bytes per mode: all answered below 500,
    and the service logs no traceback."""
    settings = dict(SERVICE_SETTINGS)
    if mode == "api_keys":
        settings["API_KEYS"] = f"fuzz:{KEY}"
    service = ServiceProcess(tmp_path / "data", settings)
    service.run_cli("seed", "70000", "70007")
    await service.start()
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        _, spec = await service.json("GET", "/openapi.json")
        operations = sorted(
            (method.upper(), path)
            for path, item in spec["paths"].items()
            for method in item
            if path != "/v1/download/{job_id}/events" or method == "get"
        )
        status, job = await service.json(
            "POST", "/v1/download/initiate?", json={"file_ids": [70000]}, headers=auth
        )
        assert 202 == status, job
        result = await _finished(service, job["jobId"], auth)
        file_query = result["downloadUrl"].split("?", 1)[1]

        rng = random.Random(f"{SEED}-{mode}")
        requests = fuzzed_requests(rng, operations, job["jobId"], file_query)
        statuses: Counter[int] = Counter()
        refused_by_parser = [0]  # malformed HTTP: aiohttp's own plain 400
        server_errors: list[str] = []
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(description: str, raw: bytes) -> None:
            async with gate:
                response = await rawhttp.send(service.port, raw)
            statuses[response.status] += 1
            if response.status == 400 and "problem" not in response.headers.get("content-type", ""):
                refused_by_parser[0] += 1
            if response.status >= 500:
                server_errors.append(f"{response.status} for {description}: {response.body!r}")

        await asyncio.gather(*(one(*next(requests)) for _ in range(REQUESTS)))
    finally:
        service.terminate()
    log = service.log()

    print(
        f"fuzz seed={SEED} mode={mode} requests={REQUESTS} "
        f"refused_by_http_parser={refused_by_parser[0]} statuses={sorted(statuses.items())}"
    )
    assert [] == server_errors[:5]
    assert REQUESTS == sum(statuses.values())
    assert 0 == log.count("Traceback"), log[log.find("Traceback") - 500 :][:3000]
    assert len(operations) >= 15


async def _finished(service: ServiceProcess, job_id: str, auth: dict[str, str]) -> dict[str, Any]:
    async def completed() -> dict[str, Any] | None:
        _, job = await service.json("GET", f"/v1/download/status/{job_id}", headers=auth)
        return dict(job) if job["status"] == "completed" else None

    return await wait_for(completed)
