"""Which storage the settings choose: the original service's S3 variables select S3."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yarl
from conftest import wait_for
from s3server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedServer, unique_bucket
from service import ServiceProcess
from test_s3_download import fetch

from longdl.config import Settings
from longdl.seed import demo_content


def original_env(seaweed: SeaweedServer, bucket: str) -> dict[str, str]:
    """The S3 part of the original service's .env: no STORAGE_BACKEND."""
    return {
        "S3_REGION": REGION,
        "S3_ENDPOINT": seaweed.endpoint,
        "S3_ACCESS_KEY_ID": ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_BUCKET_NAME": bucket,
        "S3_FORCE_PATH_STYLE": "true",
    }


@pytest.mark.slow
async def test_the_original_s3_variables_alone_select_s3(
    seaweed: SeaweedServer, tmp_path: Path
) -> None:
    """The original .env's S3_* and no STORAGE_BACKEND: seed, serve and bundle all use the
    bucket, the start-up log says so, and nothing lands in the local folder."""
    bucket = unique_bucket()
    service = ServiceProcess(tmp_path / "data", original_env(seaweed, bucket))
    service.env.pop("STORAGE_BACKEND", None)
    service.run_cli("seed", "70000", "70007")
    await service.start()
    try:
        status, body = await service.json(
            "POST", "/v1/download/initiate", json={"file_ids": [70000, 70007]}
        )
        assert 202 == status, body
        job_id = body["jobId"]

        async def completed() -> dict[str, object] | None:
            _, job = await service.json("GET", f"/v1/download/status/{job_id}")
            return job if job["status"] == "completed" else None

        job = await wait_for(completed, 30)
        assert isinstance(job["downloadUrl"], str)
        assert job["downloadUrl"].startswith(f"{seaweed.endpoint}/{bucket}/bundles/")
        code, _, data = await fetch(str(yarl.URL(job["downloadUrl"], encoded=True)))
    finally:
        service.terminate()

    assert 200 == code
    members = zipfile.ZipFile(io.BytesIO(data))
    assert demo_content(70007) == members.read("70007.zip")
    assert f"storage=s3 bucket={bucket} endpoint={seaweed.endpoint}" in service.log()
    assert not (tmp_path / "data" / "storage").exists()


def test_an_explicit_storage_backend_wins() -> None:
    """STORAGE_BACKEND=local with S3_* set stays local (and says what it ignores)."""
    settings = Settings(storage_backend="local", s3_bucket_name="downloads")
    assert ("local", ["S3_BUCKET_NAME"]) == (
        settings.storage_backend,
        settings.ignored_s3_variables,
    )


def test_no_s3_variables_is_local() -> None:
    """With none of the S3 location variables, the default stays the local folder."""
    settings = Settings(s3_region="eu-west-1", s3_force_path_style=False)
    assert ("local", "the default") == (settings.storage_backend, settings.storage_chosen_by)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"S3_ACCESS_KEY_ID": "k", "S3_BUCKET_NAME": "downloads"},
            "S3_SECRET_ACCESS_KEY is required when S3_ACCESS_KEY_ID is set",
        ),
        ({"S3_ENDPOINT": "minio:9000"}, "S3_ENDPOINT must be an http:// or https:// URL"),
        ({"S3_BUCKET_NAME": "x"}, "S3_BUCKET_NAME must be a bucket name"),
        (
            {"STORAGE_BACKEND": "s3", "S3_PUBLIC_ENDPOINT": "files.example.com"},
            "S3_PUBLIC_ENDPOINT must be an http:// or https:// URL",
        ),
    ],
)
def test_an_inconsistent_s3_configuration_fails_at_start(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """longdl serve refuses to start, naming the variable to fix, without a traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "STORAGE_"))}
    result = subprocess.run(
        [sys.executable, "-m", "longdl", "serve"],
        env={**clean, "DATA_DIR": str(tmp_path), "PORT": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert 2 == result.returncode
    assert message in result.stderr
    assert "Traceback" not in result.stderr
