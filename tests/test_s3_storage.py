"""What only the S3 backend does: error mapping, buckets, multipart, public endpoint, config."""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from conftest import AppFactory
from s3server import ACCESS_KEY, SECRET_KEY, SeaweedServer, free_ports, unique_bucket

from longdl import exceptions, storage
from longdl.config import Settings
from longdl.seed import demo_size_bytes
from longdl.storage.s3 import MIN_PART_SIZE_BYTES, S3Storage, _MultipartUpload, translate


def client_error(code: str, status: int) -> ClientError:
    """The error botocore raises for an S3 answer with this code and status."""
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


# --- error mapping (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error("SlowDown", 503), exceptions.StorageUnavailable),
        (client_error("Throttling", 400), exceptions.StorageUnavailable),
        (client_error("RequestTimeout", 400), exceptions.StorageUnavailable),
        (client_error("InternalError", 500), exceptions.StorageUnavailable),
        (client_error("502", 502), exceptions.StorageUnavailable),
        (client_error("TooManyRequests", 429), exceptions.StorageUnavailable),
        (EndpointConnectionError(endpoint_url="http://s3"), exceptions.StorageUnavailable),
        (ReadTimeoutError(endpoint_url="http://s3"), exceptions.StorageUnavailable),
        (aiohttp.ServerDisconnectedError(), exceptions.StorageUnavailable),
        (ConnectionResetError(), exceptions.StorageUnavailable),
        (client_error("NoSuchKey", 404), exceptions.ObjectNotFound),
        (client_error("404", 404), exceptions.ObjectNotFound),
        (client_error("AccessDenied", 403), exceptions.StorageError),
        (client_error("SignatureDoesNotMatch", 403), exceptions.StorageError),
        (client_error("InvalidArgument", 400), exceptions.StorageError),
        (client_error("NoSuchBucket", 404), exceptions.StorageError),
        (NoCredentialsError(), exceptions.StorageError),
    ],
    ids=lambda value: (
        value.response["Error"]["Code"]
        if isinstance(value, ClientError)
        else type(value).__name__
        if isinstance(value, Exception)
        else value.__name__
    ),
)
def test_errors_map_to_retryable_or_not(error: Exception, expected: type[Exception]) -> None:
    """Outages and throttling are retryable, a missing key is not-found, the rest is final."""
    assert expected is type(translate(error, "k"))


def test_errors_of_other_kinds_are_not_translated() -> None:
    """A bug (say a KeyError) is not disguised as a storage error."""
    assert None is translate(KeyError("x"))


# --- configuration ---------------------------------------------------------------------


def test_s3_backend_is_built_from_the_original_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """STORAGE_BACKEND=s3 and the S3_* variables select and configure the S3 backend."""
    env = {
        "STORAGE_BACKEND": "s3",
        "S3_ENDPOINT": "http://minio:9000",
        "S3_REGION": "eu-west-1",
        "S3_ACCESS_KEY_ID": "id",
        "S3_SECRET_ACCESS_KEY": "secret",
        "S3_BUCKET_NAME": "my-downloads",
        "S3_FORCE_PATH_STYLE": "false",
        "S3_PUBLIC_ENDPOINT": "https://files.example.com",
        "S3_PART_SIZE_BYTES": str(16 * 1024 * 1024),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    backend = storage.from_settings(Settings())
    assert isinstance(backend, S3Storage)
    actual = (
        backend.bucket,
        backend.endpoint_url,
        backend.region,
        backend.public_endpoint,
        backend.part_size_bytes,
    )
    expected = (
        "my-downloads",
        "http://minio:9000",
        "eu-west-1",
        "https://files.example.com",
        16 * 1024 * 1024,
    )
    assert expected == actual


def test_part_size_below_the_s3_minimum_is_refused() -> None:
    """A part size under 5 MiB is a configuration error, not a failed upload later."""
    with pytest.raises(ValueError, match="part_size_bytes"):
        S3Storage("bucket", part_size_bytes=MIN_PART_SIZE_BYTES - 1)


# --- against SeaweedFS -----------------------------------------------------------------


async def test_open_creates_a_missing_bucket(s3_storage: S3Storage) -> None:
    """Opening the backend on a bucket that does not exist yet creates it."""
    buckets = await s3_storage.client.list_buckets()
    assert s3_storage.bucket in [bucket["Name"] for bucket in buckets["Buckets"]]


async def test_open_refuses_a_missing_bucket_when_creation_is_off(
    make_s3_storage: Callable[..., S3Storage],
) -> None:
    """With S3_CREATE_BUCKET off, a missing bucket stops start-up with a StorageError."""
    backend = make_s3_storage(create_bucket=False)
    with pytest.raises(exceptions.StorageError, match="does not exist") as caught:
        await backend.open()
    assert not isinstance(caught.value, exceptions.StorageUnavailable)


async def test_wrong_credentials_are_refused_and_not_retryable(seaweed: SeaweedServer) -> None:
    """A wrong secret key is a StorageError (403), never a retryable outage."""
    backend = S3Storage(
        unique_bucket(),
        endpoint_url=seaweed.endpoint,
        access_key_id=ACCESS_KEY,
        secret_access_key="not-the-secret",
    )
    with pytest.raises(exceptions.StorageError) as caught:
        await backend.open()
    assert not isinstance(caught.value, exceptions.StorageUnavailable)


async def test_check_raises_unavailable_when_s3_is_unreachable() -> None:
    """With nothing listening at the endpoint, check() raises the retryable error."""
    (port,) = free_ports(1)
    backend = S3Storage(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        connect_timeout_s=1,
    )
    await backend.open()  # start-up tolerates storage that is not up yet
    try:
        with pytest.raises(exceptions.StorageUnavailable):
            await backend.check()
    finally:
        await backend.close()


async def test_check_raises_when_the_bucket_was_deleted(s3_storage: S3Storage) -> None:
    """check() fails once the bucket is gone, so /health can say so."""
    await s3_storage.client.delete_bucket(Bucket=s3_storage.bucket)
    with pytest.raises(exceptions.StorageError, match="does not exist"):
        await s3_storage.check()


async def test_write_larger_than_a_part_uses_multipart_upload(
    make_s3_storage: Callable[..., S3Storage],
) -> None:
    """A stream of 2.5 parts lands as one object made of 3 parts (ETag suffix -3)."""
    backend = make_s3_storage(part_size_bytes=MIN_PART_SIZE_BYTES)
    await backend.open()
    try:
        data = secrets.token_bytes(MIN_PART_SIZE_BYTES * 5 // 2)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 256 * 1024):
                yield data[start : start + 256 * 1024]

        await backend.write("bundles/big.zip", chunks(), "application/zip")
        head = await backend.client.head_object(Bucket=backend.bucket, Key="bundles/big.zip")
        assert (len(data), "application/zip") == (head["ContentLength"], head["ContentType"])
        assert head["ETag"].strip('"').endswith("-3")
    finally:
        await backend.close()


async def test_a_bundle_whose_upload_fails_leaves_nothing_for_the_garbage_collector(
    make_s3_storage: Callable[..., S3Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle's second part fails to upload (S3 went away mid-bundle): the archive and
    its sources are closed as the write fails. They were left to the garbage collector,
    where zipfile's finalizer raised "Can't close the ZIP file while there is an open
    writing handle on it" (a traceback in the log per failed bundle, 7 of 8 in a chaos
    run against SeaweedFS)."""
    backend = make_s3_storage(part_size_bytes=MIN_PART_SIZE_BYTES)
    await backend.open()
    unraisable: list[Any] = []
    try:
        members = []
        for index in range(3):
            key = f"downloads/{index}.bin"
            await backend.write(key, _one(secrets.token_bytes(4 << 20)))
            members.append(storage.ZipMember(f"{index}.bin", key, 4 << 20))
        send_part = _MultipartUpload.send_part

        async def second_part_fails(upload: _MultipartUpload, data: Any) -> None:
            if upload.started:
                # The frame keeps the error it raises, as botocore's retries keep the
                # last one: the error, its traceback and the bundle's frames in it are a
                # reference cycle, which only a collection frees.
                error = exceptions.StorageUnavailable("connection reset by S3")
                raise error
            await send_part(upload, data)

        monkeypatch.setattr(_MultipartUpload, "send_part", second_part_fails)
        monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

        gc.collect()
        gc.disable()  # the collection below is the first to find the cycle
        try:
            task = asyncio.create_task(backend.write_zip("bundles/failed.zip", members))
            await asyncio.wait({task})
            failed = isinstance(task.exception(), exceptions.StorageUnavailable)
            del task
            gc.collect()
        finally:
            gc.enable()
    finally:
        await backend.close()
    assert failed
    assert [] == [f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}" for u in unraisable]


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_small_write_is_a_single_put(s3_storage: S3Storage) -> None:
    """An object smaller than a part is stored with one PutObject (a plain ETag)."""
    await s3_storage.write_bytes("bundles/small.zip", b"small", "application/zip")
    head = await s3_storage.client.head_object(Bucket=s3_storage.bucket, Key="bundles/small.zip")
    assert "-" not in head["ETag"]


async def test_urls_are_signed_for_the_public_endpoint(
    seaweed: SeaweedServer, make_s3_storage: Callable[..., S3Storage]
) -> None:
    """With S3_PUBLIC_ENDPOINT set, URLs point at that host and download from it."""
    public = f"http://localhost:{seaweed.s3_port}"  # another name for the same server
    backend = make_s3_storage(public_endpoint=public)
    await backend.open()
    try:
        await backend.write_bytes("bundles/a.zip", b"public bytes")
        signed = await backend.signed_url("bundles/a.zip", 60, "a.zip")
        async with (
            aiohttp.ClientSession() as session,
            session.get(yarl.URL(signed.url, encoded=True)) as response,
        ):
            body = await response.read()
        assert signed.url.startswith(f"{public}/{backend.bucket}/bundles/a.zip?")
        assert (200, b"public bytes") == (response.status, body)
    finally:
        await backend.close()


async def test_longdl_seed_writes_the_demo_files_into_s3(
    seaweed: SeaweedServer, make_s3_storage: Callable[..., S3Storage], tmp_path: Path
) -> None:
    """``longdl seed`` with STORAGE_BACKEND=s3 creates the bucket and uploads the files."""
    bucket = unique_bucket()
    env = {
        **os.environ,
        **{name.upper(): str(value) for name, value in seaweed.settings(bucket).items()},
        "DATA_DIR": str(tmp_path),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "longdl",
        "seed",
        "70000",
        "70007",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert 0 == process.returncode, output.decode()
    backend = make_s3_storage(bucket=bucket, create_bucket=False)
    await backend.open()
    try:
        sizes = [await backend.head(f"downloads/{file_id}.zip") for file_id in (70000, 70007)]
    finally:
        await backend.close()
    assert [demo_size_bytes(70000), demo_size_bytes(70007)] == [
        info.size_bytes if info else None for info in sizes
    ]


# --- through the app -------------------------------------------------------------------


async def test_health_is_ok_on_s3(make_client: AppFactory, seaweed: SeaweedServer) -> None:
    """/health answers 200 with storage ok when S3 is up."""
    client = await make_client(**seaweed.settings())
    response = await client.get("/health")
    body: dict[str, Any] = await response.json()
    assert (200, "ok") == (response.status, body["checks"]["storage"])


async def test_health_is_503_when_s3_is_unreachable(make_client: AppFactory) -> None:
    """/health answers 503 with storage error when nothing listens at S3_ENDPOINT."""
    (port,) = free_ports(1)
    client = await make_client(
        storage_backend="s3",
        s3_endpoint=f"http://127.0.0.1:{port}",
        s3_access_key_id=ACCESS_KEY,
        s3_secret_access_key=SECRET_KEY,
        s3_connect_timeout_s=0.5,
        seed_ids=(),
    )
    response = await client.get("/health")
    body: dict[str, Any] = await response.json()
    assert (503, "unhealthy", "error") == (
        response.status,
        body["status"],
        body["checks"]["storage"],
    )


async def test_health_is_503_when_the_bucket_is_missing(
    make_client: AppFactory, seaweed: SeaweedServer
) -> None:
    """/health answers 503 with storage error once the bucket has been deleted."""
    settings = seaweed.settings()
    client = await make_client(**settings, seed_ids=())
    backend = seaweed.storage(settings["s3_bucket_name"], create_bucket=False)
    await backend.open()
    try:
        await backend.client.delete_bucket(Bucket=backend.bucket)
    finally:
        await backend.close()
    response = await client.get("/health")
    body: dict[str, Any] = await response.json()
    assert (503, "error") == (response.status, body["checks"]["storage"])
