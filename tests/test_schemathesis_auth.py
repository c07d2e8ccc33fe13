"""schemathesis, every check, against a real ``longdl serve`` with API_KEYS set: without a
key or with a wrong one, every operation that needs a key answers the 401 its OpenAPI
entry describes (and nothing else asks for one); with the key, nothing is found either,
including by the check that requests without the key are refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import IN_CI, test_settings
from fuzz import run, schemathesis_binary

from longdl.app import create_app
from longdl.web import openapi

pytestmark = pytest.mark.slow

SEED = 7
MAX_EXAMPLES = 50
KEY = "schemathesis-key-0123456789"
#: On top of tests/fuzz.py's lifted limits: guesses must not turn into 429s.
SETTINGS = {"API_KEYS": f"st:{KEY}", "RATE_LIMIT_AUTH_FAILURES": "100000000"}
CREDENTIALS = {
    "no_key": (),
    "wrong_key": ("-H", "Authorization: Bearer not-the-key"),
    "valid_key": ("-H", f"Authorization: Bearer {KEY}"),
}


def guarded_operations(tmp_path: Path) -> set[str]:
    """``METHOD /path`` of every operation the OpenAPI document says needs a key."""
    app = create_app(test_settings(tmp_path / "spec", api_keys=[f"st:{KEY}"]))
    return {
        f"{method.upper()} {path}"
        for path, item in openapi.build_spec(app)["paths"].items()
        for method, operation in item.items()
        if operation["security"]
    }


@pytest.mark.parametrize("credentials", CREDENTIALS.values(), ids=CREDENTIALS)
async def test_schemathesis_finds_nothing_with_api_keys(
    tmp_path: Path, credentials: tuple[str, ...]
) -> None:
    """No failure in any case; without a valid key, every /v1 operation and /metrics
    answered only 401, and with it none did."""
    if schemathesis_binary() is None:
        message = "schemathesis is not installed (the [test] extra installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    guarded = guarded_operations(tmp_path)
    report_path = tmp_path / "report.json"
    result = await asyncio.to_thread(
        run,
        tmp_path,
        max_examples=MAX_EXAMPLES,
        seed=SEED,
        settings=SETTINGS,
        extra_args=("--report", "json", "--report-json-path", str(report_path), *credentials),
    )
    report = json.loads(report_path.read_text())
    only_401 = set(report["warnings"]["missing_auth"])
    print(
        f"schemathesis seed={SEED} max_examples={MAX_EXAMPLES} credentials={credentials[1:]} "
        f"cases={report['test_cases']['generated']} failures={len(report['failures'])}"
    )

    assert 0 == result.returncode, result.stdout[-6000:]
    assert ([], []) == (report["failures"], report["errors"])
    assert {"POST /v1/download/initiate", "GET /metrics"} <= guarded
    if credentials == CREDENTIALS["valid_key"]:
        assert set() == guarded & only_401
    else:
        assert guarded <= only_401
