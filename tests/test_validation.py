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


# --- the schema says exactly what the server accepts -----------------------------------

NULL_IDS_BODIES = {
    "both null": '{"file_ids": null, "file_id": null}',
    "ids null, no id": '{"file_ids": null}',
}


@pytest.mark.parametrize("body", NULL_IDS_BODIES.values(), ids=NULL_IDS_BODIES.keys())
async def test_null_ids_are_refused_naming_file_ids(
    client: TestClient[Any, Any], body: str
) -> None:
    """Null ids count as absent: the 400 says to send file_ids, and nothing is created."""
    response = await client.post(
        "/v1/download/initiate", data=body, headers={"Content-Type": "application/json"}
    )
    problem = await response.json()
    assert 400 == response.status
    assert ["file_ids"] == [e["field"] for e in problem["errors"]]
    assert 0 == job_count(client)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/download/initiate", {"file_ids": [70000.0, 70007.0]}),
        ("/v1/download/initiate", {"file_id": 70000.0}),
        ("/v1/download/check", {"file_id": 70000.0}),
        ("/v1/download/start", {"file_id": 70000.0}),
    ],
)
async def test_integral_numbers_are_integers(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    """70000.0 is an integer in JSON Schema, so the server takes it as 70000."""
    response = await client.post(path, json=body)
    assert response.status in (200, 202), await response.text()


async def test_extra_properties_are_ignored(client: TestClient[Any, Any]) -> None:
    """A body with fields the schema does not name still starts the job (they are ignored)."""
    response = await client.post(
        "/v1/download/initiate", json={"file_ids": [70000], "source": "frontend", "n": 1}
    )
    assert 202 == response.status


async def test_misspelt_field_is_answered_with_the_right_name(
    client: TestClient[Any, Any],
) -> None:
    """fileIds instead of file_ids: the error names file_ids and says fileIds is not it."""
    response = await client.post("/v1/download/initiate", json={"fileIds": [70000]})
    problem = await response.json()
    assert 400 == response.status
    assert ["file_ids"] == [e["field"] for e in problem["errors"]]
    message = problem["errors"][0]["message"]
    assert "file_ids" in message and "fileIds" in message


async def test_misspelt_single_field_is_answered_with_the_right_name(
    client: TestClient[Any, Any],
) -> None:
    """fileId on check: the error is on file_id and names the spelling that was sent."""
    response = await client.post("/v1/download/check", json={"fileId": 70000})
    problem = await response.json()
    assert [("file_id", "Field required; the field is file_id, not fileId")] == [
        (e["field"], e["message"]) for e in problem["errors"]
    ]


@pytest.mark.parametrize(
    "body",
    ["{}", '{"file_ids": [70000], "file_id": 70007}', '{"file_ids": [1]}', '{"file_id": "x"}'],
)
async def test_messages_carry_no_library_prefix(client: TestClient[Any, Any], body: str) -> None:
    """Messages are written for the client: no "Value error, " or other pydantic prefix."""
    response = await client.post(
        "/v1/download/initiate", data=body, headers={"Content-Type": "application/json"}
    )
    messages = [e["message"] for e in (await response.json())["errors"]]
    assert messages
    assert [] == [m for m in messages if "error," in m.lower() or "failed," in m.lower()]
