"""/openapi.json is valid OpenAPI 3.1, covers every route, and real responses match it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, hdrs, web
from aiohttp.test_utils import TestClient
from conftest import finished, test_settings
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from longdl.app import create_app
from longdl.engine import Artifact, JobContext
from longdl.seed import seed
from longdl.web import keys

SPEC_URI = "urn:longdl:openapi"


class Recorder:
    """Remembers which route answered each request id (added to on_response_prepare)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, str]] = {}

    async def __call__(self, request: web.Request, response: web.StreamResponse) -> None:
        resource = request.match_info.route.resource
        if resource is not None:
            self.routes[request[keys.REQUEST_ID]] = (request.method, resource.canonical)


class Contract:
    """Checks responses against the spec and counts which operations were exercised."""

    def __init__(self, spec: dict[str, Any], recorder: Recorder) -> None:
        self.spec = spec
        self.recorder = recorder
        self.registry = Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(spec))
        self.seen: set[tuple[str, str]] = set()

    async def check(self, response: ClientResponse) -> ClientResponse:
        method, path = self.recorder.routes[response.headers["X-Request-ID"]]
        if method == "HEAD":
            method = "GET"
        operation = self.spec["paths"][path][method.lower()]
        documented = operation["responses"]
        status = str(response.status)
        assert status in documented, f"{method} {path} answered undocumented {status}"
        self.seen.add((method.lower(), path))
        content = documented[status].get("content")
        if content is None:
            assert b"" == await response.read() or 300 <= response.status < 400
            return response
        media = response.content_type
        assert media in content, f"{method} {path} {status}: {media} not in {list(content)}"
        if media.endswith("json"):
            schema = content[media]["schema"]
            if "$ref" in schema:
                schema = {"$ref": SPEC_URI + schema["$ref"]}
            body = json.loads(await response.read())
            errors = list(Draft202012Validator(schema, registry=self.registry).iter_errors(body))
            assert [] == [e.message for e in errors], f"{method} {path} {status}"
        return response


class Gate:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handler(self, ctx: JobContext) -> Artifact:
        await self.release.wait()
        info = await ctx.storage.write_bytes(f"bundles/{ctx.job_id}.txt", b"ok")
        return Artifact(key=info.key, filename="ok.txt", size_bytes=info.size_bytes)


@pytest.fixture
async def contract_client(
    aiohttp_client: Any, tmp_path: Path
) -> AsyncIterator[tuple[TestClient[Any, Any], Contract, Gate]]:
    gate = Gate()
    app = create_app(test_settings(tmp_path / "data"), handlers={"gate": gate.handler})
    recorder = Recorder()
    app.on_response_prepare.append(recorder)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    await seed(app[keys.STORAGE], (70000, 70007))
    spec = await (await client.get("/openapi.json")).json()
    yield client, Contract(spec, recorder), gate
    gate.release.set()


async def test_spec_is_valid_openapi_3_1(client: TestClient[Any, Any]) -> None:
    """The document passes the OpenAPI 3.1 validator, and /openapi serves the same."""
    spec = await (await client.get("/openapi.json")).json()
    validate_openapi(spec)
    assert "3.1.0" == spec["openapi"]
    assert spec == await (await client.get("/openapi")).json()


async def test_every_route_is_documented(client: TestClient[Any, Any]) -> None:
    """Each route the app serves appears in the spec with a unique operationId."""
    spec = await (await client.get("/openapi.json")).json()
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(m, path) for path, ops in spec["paths"].items() for m in ops}
    assert served == documented
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


async def test_real_responses_match_the_spec(
    contract_client: tuple[TestClient[Any, Any], Contract, Gate],
) -> None:
    """Every route, driven through its main answers, responds as /openapi.json says."""
    client, contract, _gate = contract_client
    check = contract.check
    post = client.post
    get = client.get

    await check(await get("/"))
    await check(await get("/health"))
    await check(await get("/openapi.json"))
    await check(await get("/openapi"))
    await check(await get("/docs"))
    await check(await get("/docs/init.js"))
    await check(await get("/docs/assets/swagger-ui.css"))
    await check(await get("/docs/assets/nothing.js"))
    await check(await post("/v1/download/check", json={"file_id": 70000}))
    await check(await post("/v1/download/check", json={"file_id": 5}))
    await check(await post("/v1/download/check", data="x"))

    # initiate: 202, replay, 422, 400, 200 with Prefer: wait
    accepted = await check(
        await post(
            "/v1/download/initiate",
            json={"file_ids": [70000, 70007]},
            headers={"Idempotency-Key": "c-1"},
        )
    )
    job_id = (await accepted.json())["jobId"]
    await check(
        await post(
            "/v1/download/initiate", json={"file_ids": [70000]}, headers={"Idempotency-Key": "c-1"}
        )
    )
    await check(await post("/v1/download/initiate", json={"file_ids": []}))
    await check(
        await post(
            "/v1/download/initiate", json={"file_ids": [70007]}, headers={"Prefer": "wait=10"}
        )
    )
    done = await finished(client, job_id)
    assert "completed" == done["status"]

    # status: 200, 304, 400, 404
    status = await check(await get(f"/v1/download/status/{job_id}"))
    tag = status.headers["ETag"]
    await check(await get(f"/v1/download/status/{job_id}", headers={"If-None-Match": tag}))
    await check(await get(f"/v1/download/status/{job_id}?wait=x"))
    await check(await get("/v1/download/status/00000000-0000-0000-0000-000000000000"))

    # result: 302, 200, 202, 404, 409; files: 200, 206, 403
    redirect = await check(await get(f"/v1/download/{job_id}", allow_redirects=False))
    location = redirect.headers["Location"]
    await check(await get(f"/v1/download/{job_id}?redirect=false"))
    await check(await get(location))
    await check(await get(location, headers={hdrs.RANGE: "bytes=10-"}))
    await check(await get(location.replace("sig=", "sig=0")))
    missing = await post("/v1/download/initiate", json={"file_ids": [99999]})
    failed_id = (await missing.json())["jobId"]
    await finished(client, failed_id)
    await check(await get(f"/v1/download/{failed_id}"))
    await check(await get("/v1/download/not-a-job"))
    running = await client.app[keys.ENGINE].submit("gate", {})
    await check(await get(f"/v1/download/{running.job.id}"))

    # cancel (POST and DELETE): 200, 409, 404
    await check(await post(f"/v1/download/cancel/{running.job.id}"))
    await check(await client.delete(f"/v1/download/{running.job.id}"))
    queued = await client.app[keys.ENGINE].submit("gate", {})
    await check(await client.delete(f"/v1/download/{queued.job.id}"))
    await check(await post("/v1/download/cancel/00000000-0000-0000-0000-000000000000"))

    # start: 200 (local), 202 (remote)
    await check(await post("/v1/download/start", json={"file_id": 70000}))
    await check(
        await post(
            "/v1/download/start",
            json={"file_id": 70000},
            headers={"Origin": "https://app.example.com"},
        )
    )

    # history: 200, 400
    await check(await get("/v1/download/history?limit=2"))
    await check(await get("/v1/download/history?limit=0"))
    await check(await get("/metrics"))
    await check(await get("/ui"))
    await check(await get("/ui/", allow_redirects=False))
    await check(await get("/ui/longdl-client.js"))
    await check(await get("/ui/app.css"))
    await check(await get("/ui/nothing.js"))
    await check(await get(f"/v1/download/{job_id}/events"))
    await check(await get(f"/v1/download/{job_id}/events", headers={"Last-Event-ID": "x"}))

    documented = {(m, path) for path, ops in contract.spec["paths"].items() for m in ops}
    assert documented == contract.seen, "operations not exercised by this test"
