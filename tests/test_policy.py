"""Request policy through a real app: API keys, limits, CORS, security headers, problems."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished

from longdl.storage import LocalStorage, ObjectInfo
from longdl.web import policy

SLOW = {
    "download_delay_enabled": True,
    "download_delay_min_ms": 60_000,
    "download_delay_max_ms": 60_000,
}
KEYS = {"api_keys": ["alice:key-a", "bob:key-b"]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def initiate_as(client: TestClient[Any, Any], key: str, file_ids: list[int]) -> str:
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": file_ids}, headers=bearer(key)
    )
    assert 202 == response.status, await response.text()
    return str((await response.json())["jobId"])


# --- API keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-a"}]
)
async def test_api_keys_require_a_valid_bearer_key(
    make_client: AppFactory, headers: dict[str, str]
) -> None:
    """With API_KEYS set, /v1 without a valid Bearer key is 401 and creates nothing."""
    client = await make_client(**KEYS)
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": [70000]}, headers=headers
    )
    assert 401 == response.status
    assert "application/problem+json" == response.content_type
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    history = await client.get("/v1/download/history", headers=bearer("key-a"))
    assert [] == (await history.json())["items"]


async def test_service_routes_stay_open_with_api_keys(make_client: AppFactory) -> None:
    """/health and / need no key, so probes and discovery keep working."""
    client = await make_client(**KEYS)
    assert 200 == (await client.get("/health")).status
    assert 200 == (await client.get("/")).status


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/download/status/{id}"),
        ("GET", "/v1/download/status/{id}?wait=5"),
        ("GET", "/v1/download/{id}"),
        ("GET", "/v1/download/{id}?redirect=false"),
        ("POST", "/v1/download/cancel/{id}"),
        ("DELETE", "/v1/download/{id}"),
        ("GET", "/v1/download/{id}/events"),
    ],
)
async def test_another_keys_job_is_404(make_client: AppFactory, method: str, path: str) -> None:
    """Bob cannot see, fetch or cancel Alice's job: it does not exist for him."""
    client = await make_client(**KEYS)
    job_id = await initiate_as(client, "key-a", [70000])
    await finished_as(client, job_id, "key-a")

    response = await client.request(method, path.format(id=job_id), headers=bearer("key-b"))

    assert 404 == response.status
    assert "JOB_NOT_FOUND" == (await response.json())["code"]
    mine = await client.get(f"/v1/download/status/{job_id}", headers=bearer("key-a"))
    assert "completed" == (await mine.json())["status"]


async def finished_as(client: TestClient[Any, Any], job_id: str, key: str) -> None:
    client.session.headers.update(bearer(key))
    try:
        await finished(client, job_id)
    finally:
        client.session.headers.pop("Authorization")


async def test_history_lists_only_the_callers_jobs(make_client: AppFactory) -> None:
    """Each key's history holds its own jobs only."""
    client = await make_client(**KEYS)
    alice = await initiate_as(client, "key-a", [70000])
    bob = await initiate_as(client, "key-b", [70007])
    for key, expected in (("key-a", [alice]), ("key-b", [bob])):
        body = await (await client.get("/v1/download/history", headers=bearer(key))).json()
        assert expected == [item["jobId"] for item in body["items"]]


async def test_idempotency_keys_are_scoped_to_the_caller(make_client: AppFactory) -> None:
    """Two callers using the same Idempotency-Key get two different jobs."""
    client = await make_client(**KEYS)
    ids = []
    for key in ("key-a", "key-b"):
        response = await client.post(
            "/v1/download/initiate",
            json={"file_ids": [70000]},
            headers={**bearer(key), "Idempotency-Key": "same"},
        )
        ids.append((await response.json())["jobId"])
    assert ids[0] != ids[1]


# --- rate limits -----------------------------------------------------------------------


async def test_rate_limit_headers_count_down_then_429(make_client: AppFactory) -> None:
    """Three requests per window: RateLimit-Remaining goes 2, 1, 0, then 429 + Retry-After."""
    client = await make_client(rate_limit_max_requests=3, rate_limit_window_ms=60_000)
    remaining = []
    for _ in range(3):
        response = await client.post("/v1/download/check", json={"file_id": 70000})
        assert 200 == response.status
        remaining.append(response.headers["RateLimit-Remaining"])
        assert "3" == response.headers["RateLimit-Limit"]
        assert "3;w=60" == response.headers["RateLimit-Policy"]
        assert 0 < int(response.headers["RateLimit-Reset"]) <= 60

    refused = await client.post("/v1/download/check", json={"file_id": 70000})

    assert ["2", "1", "0"] == remaining
    assert 429 == refused.status
    assert "RATE_LIMITED" == (await refused.json())["code"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


async def test_polling_routes_have_their_own_budget(make_client: AppFactory) -> None:
    """With the API budget spent, polling a job still works (up to its larger budget)."""
    client = await make_client(rate_limit_max_requests=1, rate_limit_poll_max_requests=50)
    response = await client.post("/v1/download/initiate", json={"file_ids": [70000]})
    job_id = (await response.json())["jobId"]
    assert 429 == (await client.post("/v1/download/check", json={"file_id": 70000})).status

    polls = [await client.get(f"/v1/download/status/{job_id}") for _ in range(5)]

    assert [200] * 5 == [poll.status for poll in polls]
    assert "50" == polls[0].headers["RateLimit-Limit"]


@pytest.mark.parametrize("path", ["/", "/health", "/openapi.json", "/ui", "/v2/nothing"])
async def test_rate_limit_headers_outside_v1(make_client: AppFactory, path: str) -> None:
    """Routes outside /v1 carry RateLimit-* too, and count against the polling budget."""
    client = await make_client(rate_limit_max_requests=5, rate_limit_poll_max_requests=50)
    first = await client.get(path, allow_redirects=False)
    second = await client.get(path, allow_redirects=False)
    assert ("50", "50;w=60") == (
        first.headers["RateLimit-Limit"],
        first.headers["RateLimit-Policy"],
    )
    assert 1 == int(first.headers["RateLimit-Remaining"]) - int(
        second.headers["RateLimit-Remaining"]
    )


async def test_service_routes_are_limited_too(make_client: AppFactory) -> None:
    """Once the polling budget is spent, GET / is 429 with Retry-After like any route."""
    client = await make_client(rate_limit_poll_max_requests=2)
    answers = [await client.get("/") for _ in range(3)]
    assert [200, 200, 429] == [r.status for r in answers]
    assert answers[2].headers["Retry-After"]


async def test_preflight_shows_the_window_without_spending_it(make_client: AppFactory) -> None:
    """A CORS preflight carries RateLimit-* of the route it asks about, and costs nothing."""
    client = await make_client(rate_limit_max_requests=5)
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    answers = [await client.options("/v1/download/check", headers=preflight) for _ in range(2)]
    assert [204, 204] == [r.status for r in answers]
    assert ["5", "5"] == [r.headers["RateLimit-Remaining"] for r in answers]


async def test_forwarded_for_is_ignored_from_untrusted_peers(make_client: AppFactory) -> None:
    """A client cannot get a fresh budget by inventing X-Forwarded-For."""
    client = await make_client(rate_limit_max_requests=1)
    first = await client.post(
        "/v1/download/check", json={"file_id": 70000}, headers={"X-Forwarded-For": "198.51.100.1"}
    )
    second = await client.post(
        "/v1/download/check", json={"file_id": 70000}, headers={"X-Forwarded-For": "198.51.100.2"}
    )
    assert (200, 429) == (first.status, second.status)


async def test_forwarded_for_counts_from_a_trusted_proxy(make_client: AppFactory) -> None:
    """Behind a trusted proxy, each forwarded client has its own budget."""
    client = await make_client(rate_limit_max_requests=1, trusted_proxies=["127.0.0.0/8"])
    statuses = []
    for address in ("198.51.100.1", "198.51.100.2", "198.51.100.1"):
        response = await client.post(
            "/v1/download/check", json={"file_id": 70000}, headers={"X-Forwarded-For": address}
        )
        statuses.append(response.status)
    assert [200, 200, 429] == statuses


async def test_a_long_forwarded_chain_is_read_as_a_short_one(make_client: AppFactory) -> None:
    """A chain too long to be remembered still names its client, the last hop that is not
    a trusted proxy, whatever the client put before it."""
    client = await make_client(rate_limit_max_requests=1, trusted_proxies=["127.0.0.0/8"])
    forged = ", ".join(f"203.0.113.{i}" for i in range(40))  # the client's own invention
    statuses = []
    for chain in (f"{forged}, 198.51.100.7, 127.0.0.2", "198.51.100.7", f"{forged}, 198.51.100.8"):
        response = await client.post(
            "/v1/download/check", json={"file_id": 70000}, headers={"X-Forwarded-For": chain}
        )
        statuses.append(response.status)
    assert [200, 429, 200] == statuses


async def test_a_proxys_own_requests_and_its_clients_keep_their_own_budgets(
    make_client: AppFactory,
) -> None:
    """The caller address remembered per peer is the proxy's own: a request it sends
    without X-Forwarded-For neither spends nor takes a forwarded client's budget."""
    client = await make_client(rate_limit_max_requests=1, trusted_proxies=["127.0.0.0/8"])
    statuses = []
    for headers in (
        {},
        {"X-Forwarded-For": "198.51.100.1"},
        {},
        {"X-Forwarded-For": "198.51.100.1"},
    ):
        response = await client.post("/v1/download/check", json={"file_id": 70000}, headers=headers)
        statuses.append(response.status)
    assert [200, 200, 429, 429] == statuses


async def test_plans_are_kept_per_route_and_bounded(make_client: AppFactory) -> None:
    """A route's plan is worked out once per route and method, not per URL: polls of
    many jobs and methods a client makes up leave a handful of plans, each still right."""
    client = await make_client(**KEYS)
    for n in range(50):
        await client.get(f"/v1/download/status/{uuid.uuid4()}", headers=bearer("key-a"))
        await client.request(f"X{n}", f"/v1/download/status/{n}")
    assert 200 == (await client.get("/health")).status
    plans = client.app[policy.POLICY]._plans
    assert len(plans) <= 3
    by_template = {plan.template: plan for plan in plans.values()}
    status = by_template["/v1/download/status/{job_id}"]
    assert ("poll", True) == (status.budget, status.guarded)
    assert ("poll", False) == (by_template["/health"].budget, by_template["/health"].guarded)
    # Unknown methods, as unknown URLs, are worked out each time and never kept.
    assert all(not method.startswith("X") for method, *_ in plans)


def test_client_address_reads_the_chain_right_to_left() -> None:
    """The first untrusted hop from the right is the client; spoofed left entries lose."""
    trusted = [policy.ipaddress.ip_network("10.0.0.0/8")]
    chain = ["1.1.1.1, 203.0.113.7, 10.0.0.2"]
    assert "203.0.113.7" == policy.client_address("10.0.0.1", chain, trusted)
    assert "192.0.2.5" == policy.client_address("192.0.2.5", chain, trusted)
    assert "10.0.0.1" == policy.client_address("10.0.0.1", [], trusted)


# --- back-pressure ---------------------------------------------------------------------


async def test_too_many_active_jobs_is_429(make_client: AppFactory) -> None:
    """A caller at MAX_ACTIVE_PER_USER unfinished jobs gets 429 until one finishes."""
    client = await make_client(max_active_per_user=2, **SLOW)
    first = await (await client.post("/v1/download/initiate", json={"file_id": 70000})).json()
    await client.post("/v1/download/initiate", json={"file_id": 70007})

    refused = await client.post("/v1/download/initiate", json={"file_id": 70014})
    await client.post(f"/v1/download/cancel/{first['jobId']}")
    accepted = await client.post("/v1/download/initiate", json={"file_id": 70014})

    assert 429 == refused.status
    assert "TOO_MANY_ACTIVE_JOBS" == (await refused.json())["code"]
    assert refused.headers["Retry-After"]
    assert 202 == accepted.status


async def test_full_queue_is_503(make_client: AppFactory) -> None:
    """More than MAX_QUEUED waiting jobs: 503 + Retry-After, and no row is added."""
    client = await make_client(max_queued=1, worker_concurrency=1, **SLOW)
    for file_id in (70000, 70007):  # one runs, one waits
        assert 202 == (await client.post("/v1/download/initiate", json={"file_id": file_id})).status

    refused = await client.post("/v1/download/initiate", json={"file_id": 70014})
    history = await (await client.get("/v1/download/history")).json()

    assert 503 == refused.status
    assert "OVERLOADED" == (await refused.json())["code"]
    assert int(refused.headers["Retry-After"]) > 0
    assert 2 == len(history["items"])


async def test_a_burst_of_initiates_does_not_overshoot_the_queue_limit(
    make_client: AppFactory,
) -> None:
    """Forty initiates at once with two free slots: at most two run and MAX_QUEUED (5)
    wait; the rest get 503. (Each insert used to be offered a claim while any slot looked
    free: all forty were inserted as running, past the queue check, and then given back
    to the queue.)"""
    client = await make_client(max_queued=5, worker_concurrency=2, max_active_per_user=1000, **SLOW)

    answers = await asyncio.gather(
        *(client.post("/v1/download/initiate", json={"file_id": 70000}) for _ in range(40))
    )
    statuses = [answer.status for answer in answers]
    jobs = (await (await client.get("/v1/download/history?limit=100")).json())["items"]
    waiting = [job for job in jobs if job["status"] == "queued"]

    assert set(statuses) <= {202, 503}
    assert len(jobs) == statuses.count(202)
    assert 5 <= statuses.count(202) <= 7, statuses
    assert len(waiting) <= 5, [job["status"] for job in jobs]


# --- problems and headers --------------------------------------------------------------


async def test_unknown_route_is_404_problem(client: TestClient[Any, Any]) -> None:
    """An unknown path is a problem+json 404 with the request id."""
    response = await client.get("/v2/nothing", headers={"X-Request-ID": "trace-1"})
    body = await response.json()
    assert 404 == response.status
    assert "application/problem+json" == response.content_type
    assert ("trace-1", 404) == (body["requestId"], body["status"])


async def test_wrong_method_is_405_with_allow(client: TestClient[Any, Any]) -> None:
    """PUT on initiate is a 405 problem that says which methods work."""
    response = await client.put("/v1/download/initiate", json={})
    assert 405 == response.status
    assert "application/problem+json" == response.content_type
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/download/initiate"),
        ("GET", "/v1/download/start"),
        ("GET", "/v1/download/check"),
        ("DELETE", "/v1/download/initiate"),
        ("OPTIONS", "/v1/download/check"),
    ],
)
async def test_wrong_method_on_a_post_route_is_405_not_a_job(
    client: TestClient[Any, Any], method: str, path: str
) -> None:
    """GET /v1/download/initiate is a wrong method (405, Allow: POST), not job "initiate"."""
    response = await client.request(method, path)
    body = await response.json()
    assert (405, "POST") == (response.status, response.headers["Allow"])
    assert "METHOD_NOT_ALLOWED" == body["code"]


async def test_wrong_method_elsewhere_allows_only_the_documented_methods(
    client: TestClient[Any, Any],
) -> None:
    """PUT on a job's result URL lists the methods of that route, nothing from its neighbours."""
    response = await client.put(f"/v1/download/{uuid.uuid4()}")
    assert 405 == response.status
    assert {"DELETE", "GET", "HEAD"} == set(response.headers["Allow"].split(","))


async def test_every_problem_carries_a_code(client: TestClient[Any, Any]) -> None:
    """404 for an unknown route, 405 and 413 name a code, like the service's own problems."""
    answers = [
        await client.get("/v2/nothing"),
        await client.put("/v1/download/initiate", json={}),
        await client.post(
            "/v1/download/initiate",
            data=b'{"pad": "' + b"x" * 70_000 + b'"}',
            headers={"Content-Type": "application/json"},
        ),
    ]
    codes = [(r.status, (await r.json()).get("code")) for r in answers]
    assert [(404, "NOT_FOUND"), (405, "METHOD_NOT_ALLOWED"), (413, "BODY_TOO_LARGE")] == codes


class BrokenStorage(LocalStorage):
    """A real local storage whose head() hits a bug."""

    async def head(self, key: str) -> ObjectInfo | None:
        raise RuntimeError("/srv/secret/path exploded")


async def test_unexpected_error_is_500_without_internals(
    make_client: AppFactory, tmp_path: Any
) -> None:
    """A bug answers 500 problem+json that names the request id but nothing internal."""
    client = await make_client(storage=BrokenStorage(tmp_path / "s", b"k" * 32), seed_ids=())
    response = await client.post("/v1/download/check", json={"file_id": 70000})
    text = await response.text()
    assert 500 == response.status
    assert "application/problem+json" == response.content_type
    assert "secret" not in text and "RuntimeError" not in text
    assert response.headers["X-Request-ID"] in text


async def test_security_headers_on_every_kind_of_response(client: TestClient[Any, Any]) -> None:
    """JSON, problems and redirects all carry the security headers and a request id."""
    job_id = str(uuid.uuid4())
    responses = [
        await client.get("/health"),
        await client.get(f"/v1/download/status/{job_id}"),
        await client.get("/nope"),
    ]
    for response in responses:
        assert "nosniff" == response.headers["X-Content-Type-Options"]
        assert "DENY" == response.headers["X-Frame-Options"]
        assert "no-referrer" == response.headers["Referrer-Policy"]
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        assert response.headers["Content-Security-Policy"]
        uuid.UUID(response.headers["X-Request-ID"])


async def test_redirect_carries_security_headers(client: TestClient[Any, Any]) -> None:
    """The 302 to a signed URL is stamped like every other response."""
    response = await client.post("/v1/download/initiate", json={"file_ids": [70000, 70007]})
    job_id = (await response.json())["jobId"]
    await finished(client, job_id)
    redirect = await client.get(f"/v1/download/{job_id}", allow_redirects=False)
    assert 302 == redirect.status
    assert "nosniff" == redirect.headers["X-Content-Type-Options"]
    assert redirect.headers["X-Request-ID"]


# --- CORS ------------------------------------------------------------------------------

APP_ORIGIN = "https://app.example.com"


async def test_preflight_from_an_allowed_origin(make_client: AppFactory) -> None:
    """A preflight from a CORS_ORIGINS origin is 204 with the methods and headers allowed."""
    client = await make_client(cors_origins=[APP_ORIGIN], **KEYS)
    response = await client.options(
        "/v1/download/initiate",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert 204 == response.status
    assert APP_ORIGIN == response.headers["Access-Control-Allow-Origin"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert {"authorization", "content-type", "idempotency-key"} <= {
        h.strip() for h in allowed.split(",")
    }


async def test_preflight_from_another_origin_is_refused(make_client: AppFactory) -> None:
    """A preflight from an origin not in CORS_ORIGINS gets no CORS grant."""
    client = await make_client(cors_origins=[APP_ORIGIN])
    response = await client.options(
        "/v1/download/initiate",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert 403 == response.status
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_headers_on_actual_responses(make_client: AppFactory) -> None:
    """An allowed origin can read the body and the polling headers of a 202."""
    client = await make_client(cors_origins=[APP_ORIGIN])
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": [70000]}, headers={"Origin": APP_ORIGIN}
    )
    assert APP_ORIGIN == response.headers["Access-Control-Allow-Origin"]
    exposed = response.headers["Access-Control-Expose-Headers"]
    assert "Location" in exposed and "Retry-After" in exposed and "RateLimit-Remaining" in exposed
    assert "Origin" in response.headers["Vary"]


async def test_wildcard_cors_by_default(client: TestClient[Any, Any]) -> None:
    """With the default CORS_ORIGINS=*, any origin may read responses."""
    response = await client.get("/health", headers={"Origin": "https://anywhere.example"})
    assert "*" == response.headers["Access-Control-Allow-Origin"]


def test_bad_settings_are_refused_at_start() -> None:
    """Malformed API_KEYS or TRUSTED_PROXIES stop the service from starting."""
    from pydantic import ValidationError

    from longdl.config import Settings

    with pytest.raises(ValidationError):
        Settings(api_keys=["no-colon"])
    with pytest.raises(ValidationError):
        Settings(trusted_proxies=["not-an-ip"])


class HangingStorage(LocalStorage):
    """A real local storage whose head() never answers (a wedged dependency)."""

    async def head(self, key: str) -> ObjectInfo | None:
        await asyncio.Event().wait()
        return None


async def test_a_wedged_request_is_cut_at_request_timeout(
    make_client: AppFactory, tmp_path: Any
) -> None:
    """A handler stuck on storage answers 504 at REQUEST_TIMEOUT_MS, not never."""
    client = await make_client(
        storage=HangingStorage(tmp_path / "s", b"k" * 32),
        seed_ids=(),
        request_timeout_ms=300,
        long_poll_max_s=0.1,
        sync_wait_max_s=0.1,
    )
    response = await client.post("/v1/download/check", json={"file_id": 70000})
    assert 504 == response.status
    assert "REQUEST_TIMEOUT" == (await response.json())["code"]


async def test_answered_requests_leave_no_deadline_behind() -> None:
    """Under steady load (one request always in flight), the deadlines of answered
    requests are let go at once, not kept until they would have passed: memory follows
    the requests in flight, not the last REQUEST_TIMEOUT_MS of traffic."""
    import tracemalloc

    from longdl.web.pipeline import Deadlines

    deadlines = Deadlines()
    held = asyncio.create_task(asyncio.Event().wait())
    connections = [asyncio.create_task(asyncio.sleep(3600)) for _ in range(64)]
    deadlines.enter(held, 30)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            deadlines.enter(connections[i % 64], 30)
            deadlines.leave(connections[i % 64])
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        for task in (held, *connections):
            task.cancel()
    assert grown < 100_000, f"{grown:,} bytes kept for 20,000 answered requests"
    assert 1 == len(deadlines)


def test_waits_must_fit_under_the_request_timeout() -> None:
    """A long-poll cap at or above REQUEST_TIMEOUT_MS is refused at start-up."""
    from pydantic import ValidationError

    from longdl.config import Settings

    with pytest.raises(ValidationError, match="LONG_POLL_MAX_S"):
        Settings(request_timeout_ms=20_000, long_poll_max_s=25)
    assert 0 == Settings(request_timeout_ms=0, long_poll_max_s=100).request_timeout_ms
