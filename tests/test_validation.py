"""Bad input gets a 400 (or 413/415) problem and creates nothing."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from longdl.web import keys


def job_count(client: TestClient[Any, Any]) -> int:
    with sqlite3.connect(client.app[keys.SETTINGS].database_path) as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


BAD_BODIES = {
    "id below range": '{"file_ids": [9999]}',
    "id above range": '{"file_ids": [100000001]}',
    "empty list": '{"file_ids": []}',
    "too many ids": json.dumps({"file_ids": list(range(10000, 11001))}),
    "invalid json": '{"file_ids": [70000,',
    "ids as strings": '{"file_ids": ["70000"]}',
    "id as float": '{"file_ids": [70000.5]}',
    "ids not a list": '{"file_ids": 70000}',
    "strict as string": '{"file_ids": [70000], "strict": "yes"}',
    "unknown priority": '{"file_ids": [70000], "priority": "urgent"}',
    "no ids at all": "{}",
    "both id forms": '{"file_ids": [70000], "file_id": 70007}',
    "json array body": "[70000]",
    "json null body": "null",
    "bad callback": '{"file_ids": [70000], "callbackUrl": "not a url"}',
    "bool as id": '{"file_ids": [true]}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_bad_initiate_body_is_400_and_creates_nothing(
    client: TestClient[Any, Any], body: str
) -> None:
    """Each malformed body is a 400 validation problem and no job row appears."""
    response = await client.post(
        "/v1/download/initiate", data=body, headers={"Content-Type": "application/json"}
    )
    problem = await response.json()
    assert 400 == response.status
    assert "application/problem+json" == response.content_type
    assert "VALIDATION_ERROR" == problem["code"]
    assert problem["errors"] and all(e["message"] for e in problem["errors"])
    assert 0 == job_count(client)


async def test_out_of_range_id_names_the_field(client: TestClient[Any, Any]) -> None:
    """The problem's errors point at the offending list element."""
    response = await client.post("/v1/download/initiate", json={"file_ids": [70000, 5]})
    problem = await response.json()
    assert ["file_ids.1"] == [e["field"] for e in problem["errors"]]


async def test_wrong_content_type_is_415(client: TestClient[Any, Any]) -> None:
    """A form-encoded body is refused with 415 and creates nothing."""
    response = await client.post("/v1/download/initiate", data={"file_ids": "70000"})
    assert 415 == response.status
    assert 0 == job_count(client)


async def test_oversized_body_is_413(client: TestClient[Any, Any]) -> None:
    """A body over the size limit is a 413 problem."""
    huge = json.dumps({"file_ids": [70000], "pad": "x" * 200_000})
    response = await client.post(
        "/v1/download/initiate", data=huge, headers={"Content-Type": "application/json"}
    )
    assert 413 == response.status
    assert "application/problem+json" == response.content_type
    assert 0 == job_count(client)


@pytest.mark.parametrize("body", ['{"file_id": 1}', '{"file_id": "70000"}', "{}", "{"])
async def test_bad_check_body_is_400(client: TestClient[Any, Any], body: str) -> None:
    """check validates file_id like initiate does."""
    response = await client.post(
        "/v1/download/check", data=body, headers={"Content-Type": "application/json"}
    )
    assert 400 == response.status
    assert "application/problem+json" == response.content_type


async def test_duplicates_are_removed_keeping_order(client: TestClient[Any, Any]) -> None:
    """Repeated ids count once, in first-seen order."""
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": [70007, 70000, 70007, 70000]}
    )
    body = await response.json()
    status = await (await client.get(body["statusUrl"])).json()
    assert 2 == body["totalFileIds"]
    assert [70007, 70000] == status["fileIds"]


async def test_single_file_id_form_is_accepted(client: TestClient[Any, Any]) -> None:
    """{file_id} is the one-file form of {file_ids}."""
    response = await client.post("/v1/download/initiate", json={"file_id": 70000})
    assert 202 == response.status
    assert 1 == (await response.json())["totalFileIds"]
