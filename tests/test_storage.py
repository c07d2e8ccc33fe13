"""One storage contract, run against every backend: the local folder and real S3 (SeaweedFS).

Each backend's test class mixes in :class:`StorageContract` and provides three fixtures:
``storage`` (opened), ``fetch`` (GET a signed URL the way a browser would) and
``leftovers`` (everything the backend holds, to prove failed writes leave nothing).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import random
import secrets
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from conftest import test_settings, wait_for

from longdl import exceptions
from longdl.app import create_app
from longdl.storage import LocalStorage, Storage, ZipMember, content_disposition
from longdl.storage.base import outlast
from longdl.storage.s3 import MIN_PART_SIZE_BYTES, S3Storage

#: Larger than one multipart part, so S3 takes the multipart path.
LARGE_BYTES = MIN_PART_SIZE_BYTES + 1024 * 1024
SMALL_BYTES = 3000
UNSAFE_KEYS = [
    "../escape.zip",
    "downloads/../../escape.zip",
    "a//b.zip",
    ".hidden",
    "/abs.zip",
    "downloads/70000.zip\n",
]


@dataclass(frozen=True)
class Fetched:
    """What a browser got for a URL."""

    status: int
    headers: dict[str, str]
    body: bytes


Fetch = Callable[[str], Awaitable[Fetched]]
Leftovers = Callable[[], Awaitable[list[str]]]


class ProducerError(Exception):
    """The bytes' producer failed half-way (a source vanished, a bug, ...)."""


async def chunks_of(data: bytes, chunk_bytes: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk_bytes):
        yield data[start : start + chunk_bytes]


async def read_all(storage: Storage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key)])


def tamper(url: str, param: str) -> str:
    """``url`` with the first character of query parameter ``param`` changed."""
    marker = f"{param}="
    at = url.index(marker) + len(marker)
    replacement = "0" if url[at] != "0" else "1"
    return url[:at] + replacement + url[at + 1 :]


async def fetch_with(session: aiohttp.ClientSession, url: str) -> Fetched:
    # encoded=True: send the signed query exactly as signed (see INFRA.md).
    async with session.get(yarl.URL(url, encoded=True), allow_redirects=False) as response:
        return Fetched(response.status, dict(response.headers), await response.read())


class StorageContract:
    """Behaviour every storage backend must show."""

    #: Query parameter holding the URL's signature.
    signature_param: str

    async def test_head_gives_the_size_of_a_written_object(self, storage: Storage) -> None:
        """head() reports the size of what write() stored."""
        await storage.write("downloads/70000.zip", chunks_of(b"z" * SMALL_BYTES))
        info = await storage.head("downloads/70000.zip")
        assert info is not None
        assert ("downloads/70000.zip", SMALL_BYTES) == (info.key, info.size_bytes)

    async def test_head_of_a_missing_key_is_none(self, storage: Storage) -> None:
        """head() of a key never written is None, not an error."""
        assert None is await storage.head("downloads/12345.zip")

    async def test_read_streams_back_the_written_bytes(self, storage: Storage) -> None:
        """read() yields exactly the bytes written, across many chunks."""
        data = secrets.token_bytes(700 * 1024)
        await storage.write("bundles/a.zip", chunks_of(data, 50_000))
        assert data == await read_all(storage, "bundles/a.zip")

    async def test_large_write_round_trips(self, storage: Storage) -> None:
        """An object larger than a multipart part is stored whole and in order."""
        data = secrets.token_bytes(2 * MIN_PART_SIZE_BYTES + 12345)
        info = await storage.write("bundles/big.zip", chunks_of(data, 256 * 1024))
        assert len(data) == info.size_bytes
        assert data == await read_all(storage, "bundles/big.zip")

    async def test_read_of_a_missing_key_raises_object_not_found(self, storage: Storage) -> None:
        """Reading a key never written raises ObjectNotFound."""
        with pytest.raises(exceptions.ObjectNotFound):
            await read_all(storage, "downloads/12345.zip")

    async def test_write_replaces_an_existing_object(self, storage: Storage) -> None:
        """Writing a key again replaces its bytes."""
        await storage.write_bytes("bundles/a.zip", b"old bytes")
        await storage.write_bytes("bundles/a.zip", b"new")
        assert b"new" == await read_all(storage, "bundles/a.zip")

    async def test_write_of_no_bytes_stores_an_empty_object(self, storage: Storage) -> None:
        """An empty stream stores an empty object."""
        info = await storage.write("bundles/empty.zip", chunks_of(b""))
        assert 0 == info.size_bytes
        assert b"" == await read_all(storage, "bundles/empty.zip")

    @pytest.mark.parametrize("size_bytes", [SMALL_BYTES, LARGE_BYTES], ids=["small", "large"])
    async def test_failing_producer_leaves_nothing_behind(
        self, storage: Storage, leftovers: Leftovers, size_bytes: int
    ) -> None:
        """When the producer fails mid-stream its error propagates and nothing is stored."""

        async def failing() -> AsyncIterator[bytes]:
            yield b"x" * size_bytes
            raise ProducerError("source vanished")

        with pytest.raises(ProducerError):
            await storage.write("bundles/broken.zip", failing())
        assert [] == await leftovers()

    @pytest.mark.parametrize("size_bytes", [SMALL_BYTES, LARGE_BYTES], ids=["small", "large"])
    async def test_canceled_write_leaves_nothing_behind(
        self, storage: Storage, leftovers: Leftovers, size_bytes: int
    ) -> None:
        """Canceling a write half-way (a job canceled while bundling) stores nothing."""
        consumed = asyncio.Event()

        async def stalling() -> AsyncIterator[bytes]:
            yield b"x" * size_bytes
            consumed.set()  # the first chunk has been written (S3: its part uploaded)
            await asyncio.Event().wait()
            yield b"never"

        task = asyncio.create_task(
            storage.write("bundles/canceled.zip", stalling()), name="longdl test write"
        )
        await asyncio.wait_for(consumed.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [] == await leftovers()

    async def test_delete_removes_the_object(self, storage: Storage) -> None:
        """After delete() the object is gone."""
        await storage.write_bytes("bundles/a.zip", b"data")
        await storage.delete("bundles/a.zip")
        assert None is await storage.head("bundles/a.zip")

    async def test_delete_of_a_missing_key_is_not_an_error(self, storage: Storage) -> None:
        """Deleting twice (a sweep racing a cancel) is harmless."""
        await storage.delete("bundles/never-written.zip")
        assert None is await storage.head("bundles/never-written.zip")

    async def test_unsafe_keys_do_not_exist_for_head(self, storage: Storage) -> None:
        """head() of a traversal or malformed key is None."""
        assert [None] * len(UNSAFE_KEYS) == [await storage.head(key) for key in UNSAFE_KEYS]

    async def test_unsafe_keys_cannot_be_written(
        self, storage: Storage, leftovers: Leftovers
    ) -> None:
        """write() refuses every traversal or malformed key and stores nothing."""
        for key in UNSAFE_KEYS:
            with pytest.raises(exceptions.ObjectNotFound):
                await storage.write_bytes(key, b"payload")
        assert [] == await leftovers()

    async def test_unsafe_keys_cannot_be_read_or_signed(self, storage: Storage) -> None:
        """read() and signed_url() refuse every traversal or malformed key."""
        for key in UNSAFE_KEYS:
            with pytest.raises(exceptions.ObjectNotFound):
                await read_all(storage, key)
            with pytest.raises(exceptions.ObjectNotFound):
                await storage.signed_url(key, 60, "x.zip")

    async def test_check_passes_on_usable_storage(self, storage: Storage) -> None:
        """check() returns quietly when the storage can serve requests."""
        assert None is await storage.check()

    # --- signed URLs -------------------------------------------------------------------

    async def test_signed_url_downloads_the_bytes_as_the_filename(
        self, storage: Storage, fetch: Fetch
    ) -> None:
        """A signed URL serves the object with Content-Disposition naming the download."""
        data = secrets.token_bytes(40_000)
        await storage.write_bytes("bundles/job.zip", data, "application/zip")
        filename = "bundle résumé 1.zip"
        signed = await storage.signed_url("bundles/job.zip", 60, filename)
        fetched = await fetch(signed.url)
        assert 200 == fetched.status
        assert data == fetched.body
        assert content_disposition(filename) == fetched.headers["Content-Disposition"]

    async def test_signed_url_expiry_is_its_lifetime_from_now(self, storage: Storage) -> None:
        """The URL's expires_at is its lifetime from now (within clock rounding)."""
        await storage.write_bytes("bundles/job.zip", b"data")
        before = time.time()
        signed = await storage.signed_url("bundles/job.zip", 900, "job.zip")
        assert before + 899 <= signed.expires_at <= time.time() + 900

    async def test_tampered_signature_is_refused(self, storage: Storage, fetch: Fetch) -> None:
        """Changing one character of the signature gets 403."""
        await storage.write_bytes("bundles/job.zip", b"secret bytes")
        signed = await storage.signed_url("bundles/job.zip", 60, "job.zip")
        fetched = await fetch(tamper(signed.url, self.signature_param))
        assert 403 == fetched.status
        assert b"secret bytes" not in fetched.body

    async def test_signed_url_cannot_be_pointed_at_another_key(
        self, storage: Storage, fetch: Fetch
    ) -> None:
        """Swapping the key in a signed URL for another existing key gets 403."""
        await storage.write_bytes("bundles/mine.zip", b"mine")
        await storage.write_bytes("bundles/theirs.zip", b"theirs")
        signed = await storage.signed_url("bundles/mine.zip", 60, "download.zip")
        fetched = await fetch(signed.url.replace("bundles/mine.zip", "bundles/theirs.zip", 1))
        assert 403 == fetched.status

    async def test_expired_url_is_refused(self, storage: Storage, fetch: Fetch) -> None:
        """A URL signed for 1 s is refused with 403 once it has expired."""
        await storage.write_bytes("bundles/job.zip", b"data")
        signed = await storage.signed_url("bundles/job.zip", 1, "job.zip")

        async def refused() -> Fetched | None:
            fetched = await fetch(signed.url)
            return fetched if fetched.status != 200 else None

        fetched = await wait_for(refused, timeout_s=15, interval_s=0.2)
        assert 403 == fetched.status
        assert time.time() >= signed.expires_at - 1

    async def test_signed_url_of_a_deleted_object_is_not_found(
        self, storage: Storage, fetch: Fetch
    ) -> None:
        """A still-valid URL to an object deleted since (an expired job) gets 404."""
        await storage.write_bytes("bundles/job.zip", b"data")
        signed = await storage.signed_url("bundles/job.zip", 60, "job.zip")
        await storage.delete("bundles/job.zip")
        assert 404 == (await fetch(signed.url)).status


class TestLocalStorage(StorageContract):
    """The local folder backend; its URLs are served by the app's ``/files/`` route."""

    signature_param = "sig"

    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[LocalStorage]:
        backend = LocalStorage(tmp_path / "storage", secrets.token_bytes(32))
        await backend.open()
        yield backend
        await backend.close()

    @pytest.fixture
    async def fetch(
        self, storage: LocalStorage, aiohttp_client: Any, tmp_path: Path
    ) -> AsyncIterator[Fetch]:
        client = await aiohttp_client(create_app(test_settings(tmp_path / "data"), storage=storage))
        root = str(client.make_url("/")).rstrip("/")
        async with aiohttp.ClientSession() as session:

            async def get(url: str) -> Fetched:
                return await fetch_with(session, root + url)

            yield get

    @pytest.fixture
    def leftovers(self, storage: LocalStorage) -> Leftovers:
        async def files() -> list[str]:
            return sorted(
                str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file()
            )

        return files


class TestS3Storage(StorageContract):
    """Real S3 (SeaweedFS); presigned URLs are fetched straight from the S3 server."""

    signature_param = "X-Amz-Signature"

    @pytest.fixture
    async def storage(self, make_s3_storage: Callable[..., S3Storage]) -> AsyncIterator[S3Storage]:
        backend = make_s3_storage(part_size_bytes=MIN_PART_SIZE_BYTES)
        await backend.open()
        yield backend
        await backend.close()

    @pytest.fixture
    async def fetch(self) -> AsyncIterator[Fetch]:
        async with aiohttp.ClientSession() as session:

            async def get(url: str) -> Fetched:
                return await fetch_with(session, url)

            yield get

    @pytest.fixture
    def leftovers(self, storage: S3Storage) -> Leftovers:
        async def objects_and_uploads() -> list[str]:
            client, bucket = storage.client, storage.bucket
            listed = await client.list_objects_v2(Bucket=bucket)
            uploads = await client.list_multipart_uploads(Bucket=bucket)
            return sorted(
                [item["Key"] for item in listed.get("Contents", [])]
                + [f"upload:{item['Key']}" for item in uploads.get("Uploads", [])]
            )

        return objects_and_uploads

    async def test_a_cancel_while_the_upload_is_being_created_still_aborts_it(
        self, storage: S3Storage, leftovers: Leftovers
    ) -> None:
        """A cancel landing after S3 created the multipart upload, before its answer was
        read, still aborts it: no upload is left billed."""
        created, release = asyncio.Event(), asyncio.Event()

        async def hold_the_answer(**_: object) -> None:
            created.set()  # S3 has created the upload and answered
            await release.wait()

        storage.client.meta.events.register("after-call.s3.CreateMultipartUpload", hold_the_answer)

        async def two_parts() -> AsyncIterator[bytes]:
            yield b"x" * (2 * MIN_PART_SIZE_BYTES)

        task = asyncio.create_task(storage.write("bundles/created.zip", two_parts()))
        try:
            await asyncio.wait_for(created.wait(), 30)
            task.cancel()
            for _ in range(3):  # each turn of the loop carries the cancel one await on
                await asyncio.sleep(0)
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
        finally:
            storage.client.meta.events.unregister(
                "after-call.s3.CreateMultipartUpload", hold_the_answer
            )
        assert [] == await leftovers()


# --- bundles written by local storage's own threads ------------------------------------


def _sources(storage: LocalStorage, sizes: list[int]) -> list[ZipMember]:
    members = []
    for index, size in enumerate(sizes):
        key = f"downloads/{90000 + index}.zip"
        path = storage.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random.Random(index).randbytes(size))
        members.append(ZipMember(f"{90000 + index}.zip", key, size))
    return members


async def test_local_bundle_is_a_valid_zip_with_its_sha256(tmp_path: Path) -> None:
    """The threaded bundle holds every source byte for byte, and its SHA-256 is right."""
    storage = LocalStorage(tmp_path, b"k" * 32)
    await storage.open()
    members = _sources(storage, [3 << 20, 1, 0, 5 << 20])
    seen: list[tuple[int, int]] = []

    written = await storage.write_zip("bundles/b.zip", members, lambda f, b: seen.append((f, b)))

    data = storage.path_of("bundles/b.zip").read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (
        written.info.size_bytes,
        written.sha256,
    )
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        for member in members:
            assert storage.path_of(member.key).read_bytes() == archive.read(member.name)
    assert (4, sum(m.size_bytes for m in members)) == seen[-1]


async def test_a_cancelled_local_bundle_leaves_nothing(tmp_path: Path) -> None:
    """Cancelling a bundle while its threads copy stops them, removes the part file and
    logs no error (the stopped copy's outcome is read)."""
    storage = LocalStorage(tmp_path, b"k" * 32)
    await storage.open()
    members = _sources(storage, [64 << 20] * 4)
    task = asyncio.create_task(storage.write_zip("bundles/c.zip", members))

    async def copying() -> list[Path]:
        return list((tmp_path / "bundles").glob(".*.part"))

    await wait_for(copying, 10, interval_s=0.002)
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    task.cancel()
    await asyncio.wait({task})
    assert task.cancelled()
    assert [] == sorted(p.name for p in (tmp_path / "bundles").iterdir())
    del task  # with it go the frames that still hold the copy's own task
    gc.collect()  # a task whose exception nobody read says so when collected
    assert [] == [context["message"] for context in errors]


async def test_a_source_gone_while_bundling_is_object_not_found(tmp_path: Path) -> None:
    """A member that is not there fails the bundle with its key and leaves nothing."""
    storage = LocalStorage(tmp_path, b"k" * 32)
    await storage.open()
    members = [*_sources(storage, [1024]), ZipMember("gone.zip", "downloads/99999.zip", 10)]
    with pytest.raises(exceptions.ObjectNotFound, match=r"downloads/99999\.zip"):
        await storage.write_zip("bundles/d.zip", members)
    assert [] == sorted(p.name for p in (tmp_path / "bundles").iterdir())


async def test_outlast_with_a_deadline_cancels_what_does_not_end() -> None:
    """outlast() waits work out through our own cancellations; with a deadline (a server
    that hangs) it cancels the work once the deadline has passed, and returns."""
    never = asyncio.ensure_future(asyncio.Event().wait())
    waiter = asyncio.ensure_future(outlast(never, 0.2))
    await asyncio.sleep(0)
    waiter.cancel()  # a cancel of our own: the wait goes on
    started = time.monotonic()
    await asyncio.wait({waiter}, timeout=5)
    assert (True, True) == (waiter.done(), never.cancelled())
    assert time.monotonic() - started < 1

    quick = asyncio.ensure_future(asyncio.sleep(0.01, "done"))
    await outlast(quick, 5)
    assert "done" == quick.result()
