"""The API keeps its own spec: schemathesis, every check, against a real ``longdl serve``.

A short run (``make fuzz`` runs the long one, over 2,000 cases). Any finding fails it:
a schema-valid request refused, a schema-invalid one accepted, an answer or header the
spec does not describe, a 5xx.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import IN_CI
from fuzz import run, schemathesis_binary
from pgserver import PostgresServer

pytestmark = pytest.mark.slow


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    """A seeded schemathesis run with --checks all reports no failure."""
    if schemathesis_binary() is None:
        message = "schemathesis is not installed (the [test] extra installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    result = run(tmp_path, max_examples=15, seed=20261201)
    summary = [line for line in result.stdout.splitlines() if "generated" in line]
    assert 0 == result.returncode, result.stdout[-6000:] + result.stderr[-2000:]
    assert summary and " 0 " not in f" {summary[-1]} ", summary


def test_schemathesis_finds_nothing_on_postgres(tmp_path: Path, postgres: PostgresServer) -> None:
    """The same campaign against a replica on PostgreSQL, whose types are stricter than
    SQLite's (its text cannot hold NUL, say): no finding there either."""
    if schemathesis_binary() is None:
        message = "schemathesis is not installed (the [test] extra installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    secret = "s" * 32
    settings = {
        "DATABASE_URL": asyncio.run(postgres.new_database()),
        "SIGNING_SECRET": secret,
        "WEBHOOK_SECRET": secret,
    }
    result = run(tmp_path, max_examples=15, seed=20261202, settings=settings)
    summary = [line for line in result.stdout.splitlines() if "generated" in line]
    assert 0 == result.returncode, result.stdout[-6000:] + result.stderr[-2000:]
    assert summary and " 0 " not in f" {summary[-1]} ", summary
