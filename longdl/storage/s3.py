"""S3 storage (AWS, MinIO, SeaweedFS, RustFS, ...) through one long-lived aiobotocore client.

Bundles stream up with multipart upload, one part in memory at a time; download URLs
are presigned at read time, for the endpoint browsers reach (``S3_PUBLIC_ENDPOINT``)
when it differs from the one the service uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore import exceptions as botocore_exceptions

from longdl import exceptions
from longdl.config import Settings
from longdl.storage.base import (
    ObjectInfo,
    Partial,
    SignedUrl,
    Storage,
    commit_or_undo,
    content_disposition,
    outlast,
    validate_key,
)

log = logging.getLogger("longdl.storage.s3")

#: S3's smallest part (except the last one) of a multipart upload.
MIN_PART_SIZE_BYTES = 5 * 1024 * 1024
#: How long a failed or canceled upload waits for its abort (and a canceled start for
#: its CreateMultipartUpload): an S3 that hangs must not hold a stop, a cancel or a
#: job's time limit for the client's two read timeouts (60 s by default). An upload left
#: behind is removed by the orphan scan.
ABORT_TIMEOUT_S = 2.0

#: Error codes meaning "try again later" whatever their HTTP status.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
#: Error codes meaning the key does not exist (HEAD answers carry only the status).
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
#: Transport failures: the request may not even have reached the server.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    botocore_exceptions.ConnectionError,
    botocore_exceptions.HTTPClientError,
    botocore_exceptions.IncompleteReadError,
    aiohttp.ClientError,
    OSError,
    TimeoutError,
)


def translate(exc: BaseException, key: str = "") -> exceptions.StorageError | None:
    """The longdl error for a botocore/transport error, or None if it is not one.

    Transient failures (connection, timeout, 5xx, throttling) become
    ``StorageUnavailable`` so the engine retries them; a missing key becomes
    ``ObjectNotFound``; everything else (access denied, other 4xx, a missing bucket)
    becomes a plain ``StorageError``, which retrying will not fix.
    """
    if isinstance(exc, botocore_exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"{code or status}: {error.get('Message') or 'no message'}"
        if code in TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return exceptions.StorageUnavailable(text)
        if code == "NoSuchBucket":
            return exceptions.StorageError(text)
        if code in NOT_FOUND_CODES or status == 404:
            return exceptions.ObjectNotFound(key)
        return exceptions.StorageError(text)
    if isinstance(exc, TRANSIENT_ERRORS):
        return exceptions.StorageUnavailable(str(exc) or type(exc).__name__)
    if isinstance(exc, botocore_exceptions.BotoCoreError):
        # Missing credentials, invalid parameters: configuration, not weather.
        return exceptions.StorageError(str(exc))
    return None


@contextlib.contextmanager
def _translated(key: str = "") -> Iterator[None]:
    """Re-raise botocore and transport errors as longdl storage errors."""
    try:
        yield
    except Exception as exc:
        mapped = translate(exc, key)
        if mapped is None:
            raise
        raise mapped from exc


class S3Storage(Storage):
    """Objects in one S3 bucket.

    Args:
        bucket: bucket holding ``downloads/`` and ``bundles/``.
        endpoint_url: S3 API endpoint; AWS when None.
        region: signing region.
        access_key_id: credentials; botocore's default chain (env, profile, instance
            role) when None.
        secret_access_key: see ``access_key_id``.
        force_path_style: ``endpoint/bucket/key`` URLs, which self-hosted servers need.
        public_endpoint: endpoint browsers reach; download URLs are signed for it.
        create_bucket: create the bucket at start-up when it is missing.
        part_size_bytes: multipart part size (at least 5 MiB); also the most a write
            holds in memory.
        connect_timeout_s: TCP connect timeout of one request.
        read_timeout_s: idle read timeout of one request.
        max_pool_connections: concurrent connections to S3.
        session: an aiobotocore session to share (it caches botocore's parsed service
            models, which take ~0.1 s to load); a new one when None.
        clock: epoch seconds, injectable for tests.
    """

    name = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        force_path_style: bool = True,
        public_endpoint: str | None = None,
        create_bucket: bool = True,
        part_size_bytes: int = 8 * 1024 * 1024,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_pool_connections: int = 32,
        session: AioSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if part_size_bytes < MIN_PART_SIZE_BYTES:
            raise ValueError(f"part_size_bytes must be at least {MIN_PART_SIZE_BYTES}")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.public_endpoint = public_endpoint
        self.region = region
        self.create_bucket = create_bucket
        self.part_size_bytes = part_size_bytes
        self._credentials = {
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
        }
        self._config = AioConfig(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if force_path_style else "auto"},
            # Checksums only where S3 demands them: several S3-compatible servers
            # reject or mangle the CRC headers newer botocore sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # One quick retry for a dropped connection; the engine does the real
            # retrying with backoff, and /health must answer within seconds.
            retries={"mode": "standard", "total_max_attempts": 2},
            max_pool_connections=max_pool_connections,
        )
        self._session = session
        self._clock = clock
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._signer: Any = None
        self._bucket_ready = False
        self._aborts: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        """The backend the ``S3_*`` settings describe, not yet opened."""
        return cls(
            settings.s3_bucket_name,
            endpoint_url=settings.s3_endpoint or None,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=settings.s3_secret_access_key or None,
            force_path_style=settings.s3_force_path_style,
            public_endpoint=settings.s3_public_endpoint or None,
            create_bucket=settings.s3_create_bucket,
            part_size_bytes=settings.s3_part_size_bytes,
            connect_timeout_s=settings.s3_connect_timeout_s,
            read_timeout_s=settings.s3_read_timeout_s,
            max_pool_connections=max(10, 2 * settings.worker_concurrency + 4),
        )

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the client(s) and make sure the bucket exists.

        An unreachable S3 does not stop start-up (storage may start after us, as in a
        compose file): it is logged, ``/health`` reports it and the bucket is
        checked again by the next ``check()``. Refused credentials do stop it.
        """
        session = self._session or get_session()
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.create_client(
                    "s3", endpoint_url=self.endpoint_url, config=self._config, **self._credentials
                )
            )
            self._signer = self._client
            if self.public_endpoint and self.public_endpoint != self.endpoint_url:
                # Presigning is local computation: this client never sends a request,
                # it only signs for the host browsers will send the URL to.
                self._signer = await stack.enter_async_context(
                    session.create_client(
                        "s3",
                        endpoint_url=self.public_endpoint,
                        config=self._config,
                        **self._credentials,
                    )
                )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        try:
            await self._ensure_bucket()
        except exceptions.StorageUnavailable as exc:
            log.warning("S3 is unreachable at start-up (%s); will check again", exc)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
        stack, self._stack = self._stack, None
        self._client = self._signer = None
        self._bucket_ready = False
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        """The open aiobotocore S3 client (for tests and tools that need more)."""
        if self._client is None:
            raise RuntimeError("S3Storage is not open")
        return self._client

    async def _ensure_bucket(self) -> None:
        """Raise unless the bucket exists, creating it first when allowed."""
        try:
            with _translated():
                await self.client.head_bucket(Bucket=self.bucket)
        except exceptions.ObjectNotFound:
            if not self.create_bucket:
                raise exceptions.StorageError(
                    f"bucket {self.bucket!r} does not exist (S3_CREATE_BUCKET is off)"
                ) from None
            await self._create_bucket()
        self._bucket_ready = True

    async def _create_bucket(self) -> None:
        params: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            # AWS rejects an explicit us-east-1 constraint and requires every other one.
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            with _translated():
                await self.client.create_bucket(**params)
        except exceptions.StorageError as exc:
            cause = exc.__cause__
            if not isinstance(cause, botocore_exceptions.ClientError) or cause.response.get(
                "Error", {}
            ).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            # Another instance created it between our HEAD and our PUT.
        log.info("created bucket %s", self.bucket)

    async def check(self) -> None:
        if not self._bucket_ready:
            await self._ensure_bucket()
            return
        try:
            with _translated():
                await self.client.head_bucket(Bucket=self.bucket)
        except exceptions.ObjectNotFound:
            raise exceptions.StorageError(f"bucket {self.bucket!r} does not exist") from None

    # --- objects -----------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            validate_key(key)
        except exceptions.ObjectNotFound:
            return None
        try:
            with _translated(key):
                response = await self.client.head_object(Bucket=self.bucket, Key=key)
        except exceptions.ObjectNotFound:
            return None
        return ObjectInfo(key=key, size_bytes=int(response["ContentLength"]))

    async def read(self, key: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        validate_key(key)
        with _translated(key):
            response = await self.client.get_object(Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            while True:
                with _translated(key):
                    chunk = await body.read(chunk_bytes)
                if not chunk:
                    break
                yield chunk
        finally:
            # Release the connection even when the consumer stops early.
            body.close()

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        """Store the stream: one PutObject when it fits in a part, else multipart.

        At most one part (plus one incoming chunk) is held in memory. A failing or
        canceled producer aborts the multipart upload, so no part is left billed and
        nothing appears under ``key``.
        """
        validate_key(key)
        part_size = self.part_size_bytes
        # The part accumulates in a BytesIO that is then sent as a file: aiohttp streams
        # a file in small reads, where bytes would be copied whole (joined with the
        # headers, then into the transport buffer): three parts in memory, not one.
        buffer = io.BytesIO()
        size = 0
        upload = _MultipartUpload(self, key, content_type)
        try:
            async for chunk in chunks:
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    # Cut exactly at part boundaries: some S3 services (R2) require
                    # every part but the last to be the same size.
                    take = min(len(view), part_size - buffer.tell())
                    buffer.write(view[:take])
                    view = view[take:]
                    if buffer.tell() == part_size:
                        await upload.send_part(buffer)
                        buffer = io.BytesIO()
            if not upload.started:
                buffer.seek(0)
                await commit_or_undo(self._put(key, buffer, content_type), self._undo(key))
                return ObjectInfo(key=key, size_bytes=size)
            if buffer.tell():
                await upload.send_part(buffer)
            del buffer
            # A cancel during the completion waits it out, then deletes the object.
            await commit_or_undo(upload.complete(), self._undo(key))
        except BaseException:
            await upload.abort()
            raise
        return ObjectInfo(key=key, size_bytes=size)

    async def _put(self, key: str, body: io.BytesIO, content_type: str) -> None:
        with _translated(key):
            await self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType=content_type
            )

    def _undo(self, key: str) -> Callable[[], Any]:
        async def undo() -> None:
            try:
                await self.delete(key)
            except exceptions.StorageError as exc:
                # The job's outputs are trashed when it ends: the sweep deletes it later.
                log.warning("could not delete canceled upload %s: %r", key, exc)

        return undo

    async def delete_many(self, keys: Sequence[str]) -> list[str]:
        """DeleteObjects, a thousand keys a request."""
        failed: list[str] = []
        for start in range(0, len(keys), 1000):
            batch = list(keys[start : start + 1000])
            try:
                with _translated():
                    response = await self.client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                    )
            except exceptions.StorageError as exc:
                log.warning("deleting %d objects failed: %r", len(batch), exc)
                failed.extend(batch)
                continue
            failed.extend(str(error["Key"]) for error in response.get("Errors", []))
        return failed

    async def list_partials(self) -> list[Partial]:
        """Incomplete multipart uploads (ListMultipartUploads): S3 keeps no note of who
        started one, so the engine judges them by age."""
        found: list[Partial] = []
        params: dict[str, Any] = {"Bucket": self.bucket}
        while True:
            with _translated():
                response = await self.client.list_multipart_uploads(**params)
            for upload in response.get("Uploads", []):
                found.append(
                    Partial(
                        key=str(upload["Key"]),
                        ref=str(upload["UploadId"]),
                        writer=None,
                        started_at=upload["Initiated"].timestamp(),
                    )
                )
            if not response.get("IsTruncated"):
                return found
            params["KeyMarker"] = response.get("NextKeyMarker")
            params["UploadIdMarker"] = response.get("NextUploadIdMarker")

    async def discard_partial(self, partial: Partial) -> None:
        with _translated(partial.key):
            await self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=partial.key, UploadId=partial.ref
            )

    async def delete(self, key: str) -> None:
        try:
            validate_key(key)
        except exceptions.ObjectNotFound:
            return
        with _translated(key):
            await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def signed_url(self, key: str, expires_in_s: int, filename: str) -> SignedUrl:
        """A presigned GET for the public endpoint; the filename rides in the URL.

        ``response-content-disposition`` is part of the signed query, so S3 answers with
        ``Content-Disposition: attachment; filename=...`` and nobody can change it.
        """
        validate_key(key)
        if self._signer is None:
            raise RuntimeError("S3Storage is not open")
        expires_at = self._clock() + expires_in_s
        with _translated(key):
            url: str = await self._signer.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": key,
                    "ResponseContentDisposition": content_disposition(filename),
                },
                ExpiresIn=expires_in_s,
            )
        return SignedUrl(url=url, expires_at=expires_at)


class _MultipartUpload:
    """One multipart upload, started by its first part; completed or aborted once."""

    def __init__(self, storage: S3Storage, key: str, content_type: str) -> None:
        self._storage = storage
        self._key = key
        self._content_type = content_type
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    @property
    def started(self) -> bool:
        return self._upload_id is not None

    async def send_part(self, data: io.BytesIO) -> None:
        """Upload ``data`` (from its start) as the next part, starting the upload if needed."""
        client, bucket, key = self._storage.client, self._storage.bucket, self._key
        with _translated(key):
            if self._upload_id is None:
                await self._create()
            number = len(self._parts) + 1
            data.seek(0)
            try:
                response = await client.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=data,
                )
            finally:
                # Free the part now: the request objects that still point at it may
                # live on in a reference cycle until the next garbage collection.
                data.close()
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})

    async def _create(self) -> None:
        """Start the upload; its id is kept even when a cancel lands meanwhile, so the
        abort that follows finds the upload the server did create."""
        storage = self._storage
        create = asyncio.ensure_future(
            storage.client.create_multipart_upload(
                Bucket=storage.bucket, Key=self._key, ContentType=self._content_type
            )
        )
        try:
            created = await asyncio.shield(create)
        except asyncio.CancelledError:
            await outlast(create, ABORT_TIMEOUT_S)
            if not create.cancelled() and create.exception() is None:
                self._upload_id = str(create.result()["UploadId"])
            raise
        self._upload_id = str(created["UploadId"])

    async def complete(self) -> None:
        with _translated(self._key):
            await self._storage.client.complete_multipart_upload(
                Bucket=self._storage.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._upload_id = None

    async def abort(self) -> None:
        """Drop the uploaded parts; never raises, and survives a second cancellation."""
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        storage, key = self._storage, self._key

        async def abort() -> None:
            try:
                async with asyncio.timeout(ABORT_TIMEOUT_S):
                    await storage.client.abort_multipart_upload(
                        Bucket=storage.bucket, Key=key, UploadId=upload_id
                    )
            except Exception as exc:
                # The orphan scan removes it later (a lifecycle rule for incomplete
                # uploads is the backstop); say so.
                log.warning("could not abort multipart upload of %s: %r", key, exc)

        # Our caller may be mid-cancellation: run the abort as its own task so a
        # second cancel cannot cut it short; close() waits for it.
        task = asyncio.create_task(abort(), name=f"longdl s3 abort {key}")
        storage._aborts.add(task)
        task.add_done_callback(storage._aborts.discard)
        await asyncio.shield(task)
