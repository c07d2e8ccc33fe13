"""The storage interface every backend implements."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import hashlib
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from longdl import exceptions
from longdl.zipstream import Entry, zip_entries

T = TypeVar("T")

#: Keys are relative, slash-separated, made of safe characters, with no empty or dot segments.
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
MAX_KEY_LENGTH = 512


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise ``ObjectNotFound``.

    Rejecting rather than normalising makes path traversal impossible by construction:
    no segment may be empty, ``.`` or ``..``, or start with a dot.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise exceptions.ObjectNotFound(key)
    for segment in key.split("/"):
        # fullmatch: ``$`` would also match before a final newline ("a.zip\n").
        if not _KEY_SEGMENT.fullmatch(segment) or segment.startswith("."):
            raise exceptions.ObjectNotFound(key)
    return key


def content_disposition(filename: str) -> str:
    """An attachment header safe for any filename (RFC 6266 with RFC 5987 fallback).

    Storage needs it too: S3 URLs carry it, signed, as ``response-content-disposition``.
    """
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


@dataclass(frozen=True)
class ObjectInfo:
    """What storage knows about an object."""

    key: str
    size_bytes: int


@dataclass(frozen=True)
class Partial:
    """An upload that was started and never finished (or not yet)."""

    #: The object it would become.
    key: str
    #: The backend's handle on it (a file name, an upload id).
    ref: str
    #: The worker that wrote it, when the backend records one; None: judge by age.
    writer: str | None
    #: When it was last written to (local) or started (S3), epoch seconds.
    started_at: float


async def outlast(task: asyncio.Future[Any], timeout_s: float | None = None) -> None:
    """Wait until ``task`` has ended, through cancellations of our own (the caller
    re-raises its own), and read its outcome so no "exception was never retrieved" is
    logged: for work that must not be left running behind a cancelled caller. With
    ``timeout_s``, cancel it once that has passed (a server that hangs)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while not task.done():
        left_s = None if deadline is None else deadline - loop.time()
        if left_s is not None and left_s <= 0:
            task.cancel()
            deadline = left_s = None  # wait for the cancel to land
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=left_s)
    if not task.cancelled():
        task.exception()


async def commit_or_undo(commit: Awaitable[T], undo: Callable[[], Awaitable[None]]) -> T:
    """Run the step that makes an object appear (a rename, a multipart completion) to its
    end even when the caller is cancelled meanwhile; if the caller was cancelled and the
    step took effect, run ``undo`` before the cancellation goes on, so a canceled write
    leaves nothing behind however late the cancel lands."""
    task = asyncio.ensure_future(commit)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await outlast(task)  # the cancellation is re-raised below
        if not task.cancelled() and task.exception() is None:
            await outlast(asyncio.ensure_future(undo()))
        raise


@dataclass(frozen=True)
class ZipMember:
    """One entry of a bundle: its name in the archive, the object it copies, its size."""

    name: str
    key: str
    size_bytes: int


@dataclass(frozen=True)
class ZipWritten:
    """A bundle written: the object, and the SHA-256 of its bytes."""

    info: ObjectInfo
    sha256: str


#: ``on_progress(files_done, bytes_done)`` of :meth:`Storage.write_zip`.
ZipProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class SignedUrl:
    """A short-lived URL to download an object; relative for the local backend."""

    url: str
    expires_at: float


class Storage(abc.ABC):
    """Where source files and bundles live.

    Backends raise :class:`exceptions.StorageUnavailable` for transient failures (worth a
    retry) and :class:`exceptions.StorageError` for the rest.
    """

    #: Name reported in logs and health.
    name: str = "storage"
    #: The worker (process) writing through this backend, recorded in partial uploads
    #: where the backend can, so a sweep knows whether their writer is still alive.
    writer_id: str = ""

    async def open(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Connect or prepare; called once at start-up."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release connections; called once at shutdown."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise ``StorageError`` if the storage cannot serve requests now."""

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Size of the object, or None when it does not exist."""

    @abc.abstractmethod
    def read(self, key: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        """Stream the object's bytes. Raises ``ObjectNotFound`` when it is missing."""

    @abc.abstractmethod
    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        """Store the streamed bytes under ``key``, all or nothing.

        The object appears only once every chunk was written; on error or cancellation
        nothing is left behind.
        """

    async def write_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        """Store ``data`` under ``key``."""

        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.write(key, one(), content_type)

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    @abc.abstractmethod
    async def signed_url(self, key: str, expires_in_s: int, filename: str) -> SignedUrl:
        """A URL that downloads the object as ``filename`` until it expires."""

    async def write_zip(
        self,
        key: str,
        members: Sequence[ZipMember],
        on_progress: ZipProgress | None = None,
    ) -> ZipWritten:
        """Write a ZIP archive (entries stored) of ``members`` under ``key``, all or
        nothing like :meth:`write`, with its SHA-256; memory stays flat whatever the size.

        This streams the members through :meth:`read` into :meth:`write`; a backend may do
        it faster (local storage copies on threads of its own).

        Raises:
            exceptions.ObjectNotFound: a member's object is gone (its key).
        """
        digest = hashlib.sha256()
        done = {"files": 0, "bytes": 0}

        def source(member: ZipMember) -> AsyncGenerator[bytes, None]:
            async def chunks() -> AsyncGenerator[bytes, None]:
                async for chunk in self.read(member.key):
                    done["bytes"] += len(chunk)
                    if on_progress is not None:
                        on_progress(done["files"], done["bytes"])
                    yield chunk
                done["files"] += 1
                if on_progress is not None:
                    on_progress(done["files"], done["bytes"])

            return chunks()

        entries = [
            Entry(member.name, member.size_bytes, functools.partial(source, member))
            for member in members
        ]

        async def hashed() -> AsyncGenerator[bytes, None]:
            async with contextlib.aclosing(zip_entries(entries)) as archive:
                async for chunk in archive:
                    digest.update(chunk)
                    yield chunk

        # Closed here when the write fails or is cancelled, not by the garbage collector:
        # the archive and its sources are let go of at once (see zip_entries).
        async with contextlib.aclosing(hashed()) as stream:
            info = await self.write(key, stream, content_type="application/zip")
        return ZipWritten(info, digest.hexdigest())

    async def delete_many(self, keys: Sequence[str]) -> list[str]:
        """Remove these objects; return the keys that could not be removed now."""
        failed = []
        for key in keys:
            try:
                await self.delete(key)
            except exceptions.StorageError:
                failed.append(key)
        return failed

    async def list_partials(self) -> list[Partial]:
        """Uploads started and not finished: in progress, or abandoned by a crash."""
        return []

    async def discard_partial(self, partial: Partial) -> None:  # noqa: B027 - optional
        """Remove what an abandoned upload left (a part file, the uploaded parts)."""
