"""Local folder storage with HMAC-signed, expiring URLs served by ``GET /files/{key}``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlencode

from longdl import exceptions
from longdl.config import MIN_SIGNING_SECRET_CHARS, load_or_create_secret_file
from longdl.storage.base import (
    ObjectInfo,
    Partial,
    SignedUrl,
    Storage,
    ZipMember,
    ZipProgress,
    ZipWritten,
    commit_or_undo,
    outlast,
    validate_key,
)
from longdl.zipstream import ZipWriter

FILES_PREFIX = "/files/"
#: ``.{name}.{writer}.{random}.part``: the writer is the worker id, or ``-`` for none.
_PART_FILE = re.compile(
    r"^\.(?P<name>.+)\.(?P<writer>[A-Za-z0-9_-]+)\.(?P<rand>[0-9a-f]{32})\.part$"
)
#: What an older version named its part files: ``.{name}.{random}.part``.
_OLD_PART_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[0-9a-f]{32})\.part$")
_NO_WRITER = "-"
_PART_FILE_WRITER = re.compile(r"^[A-Za-z0-9_-]+$")


log = logging.getLogger("longdl.storage")


#: Bytes of a generated URL-signing key (kept as hex in DATA_DIR/signing.key).
SECRET_BYTES = 32


def load_or_create_secret(path: Path) -> bytes:
    """The URL-signing secret kept at ``path`` (hex), created (mode 0600) the first time.

    Raises:
        exceptions.InvalidSecret: the file is empty, short or not hex.
    """
    text = load_or_create_secret_file(
        path, lambda: secrets.token_bytes(SECRET_BYTES).hex(), _check_hex_key
    )
    return bytes.fromhex(text)


def _check_hex_key(text: str) -> None:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("it is not a hex key") from None
    if len(key) * 2 < MIN_SIGNING_SECRET_CHARS:
        raise ValueError(
            f"its key is {len(key)} bytes; at least {MIN_SIGNING_SECRET_CHARS // 2} are needed"
        )


#: Objects and their folders are the service user's alone: bundle names are job ids.
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def _create_private(path: Path) -> BinaryIO:
    """A new file at ``path`` open for writing, readable by this user only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    return os.fdopen(fd, "wb")


def _storage_error(action: str, key: str, exc: OSError) -> exceptions.StorageUnavailable:
    """A filesystem failure as the error the engine retries; a full disk says so.

    The whole error, with server paths, goes to the log; clients see the key and the
    reason only (a job's error carries this message).
    """
    log.warning("storage.local %s failed key=%s error=%s", action, key, exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return exceptions.StorageFull("No space left in local storage")
    reason = exc.strerror or type(exc).__name__
    return exceptions.StorageUnavailable(f"could not {action} {key}: {reason}")


class LocalStorage(Storage):
    """Objects as files under ``root``; writes land in a temp file and are renamed.

    Args:
        root: folder holding the objects.
        secret: HMAC key of the signed URLs.
        clock: epoch seconds, injectable for tests.
    """

    name = "local"

    def __init__(self, root: Path, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self.root = root.resolve()
        self._secret = secret
        self._clock = clock

    async def open(self) -> None:
        await asyncio.to_thread(self.root.mkdir, mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path:
        """Filesystem path of ``key``; raises ``ObjectNotFound`` for an unsafe key."""
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise exceptions.ObjectNotFound(key)
        return path

    async def check(self) -> None:
        ok = await asyncio.to_thread(lambda: self.root.is_dir() and os.access(self.root, os.W_OK))
        if not ok:
            raise exceptions.StorageUnavailable(f"{self.root} is not a writable folder")

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            path = self.path_of(key)
        except exceptions.ObjectNotFound:
            return None
        try:
            stat = await asyncio.to_thread(path.stat)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _storage_error("look up", key, exc) from exc
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size_bytes=stat.st_size)

    async def read(self, key: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        path = self.path_of(key)
        try:
            fh = await asyncio.to_thread(path.open, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise exceptions.ObjectNotFound(key) from exc
        except OSError as exc:
            raise _storage_error("read", key, exc) from exc
        try:
            while chunk := await asyncio.to_thread(fh.read, chunk_bytes):
                yield chunk
        finally:
            fh.close()

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        """Write into a part file named after the writer, then rename it into place;
        a canceled write leaves nothing (see :meth:`_part_file`)."""
        size = 0
        async with self._part_file(key) as tmp:
            fh = await asyncio.to_thread(_create_private, tmp)
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(fh.write, chunk)
                    size += len(chunk)
            finally:
                fh.close()
        return ObjectInfo(key=key, size_bytes=size)

    async def write_zip(
        self,
        key: str,
        members: Sequence[ZipMember],
        on_progress: ZipProgress | None = None,
    ) -> ZipWritten:
        """Bundle on threads of the storage's own (see :func:`_zip_files`): the loop only
        hears progress; a cancel stops the copy at the next chunk and leaves nothing."""
        sources = [(member, self.path_of(member.key)) for member in members]
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def progress(files_done: int, bytes_done: int) -> None:
            if on_progress is not None:
                loop.call_soon_threadsafe(on_progress, files_done, bytes_done)

        async with self._part_file(key) as tmp:
            work = asyncio.ensure_future(
                asyncio.to_thread(_zip_files, tmp, sources, stop, progress)
            )
            try:
                size, digest = await asyncio.shield(work)
            except asyncio.CancelledError:
                stop.set()
                await outlast(work)  # the threads stop at the next chunk
                raise
        return ZipWritten(ObjectInfo(key=key, size_bytes=size), digest)

    @contextlib.asynccontextmanager
    async def _part_file(self, key: str) -> AsyncIterator[Path]:
        """The part file to write ``key`` into, renamed into place when the block ends.

        If the block fails, or is cancelled, the part file is removed; a cancel that
        lands during the rename waits it out and removes the object, so a cancelled
        write leaves nothing, however late it comes.
        """
        path = self.path_of(key)
        await asyncio.to_thread(
            path.parent.mkdir, mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True
        )
        tmp = self._part_path(path)
        try:
            yield tmp
            await commit_or_undo(
                asyncio.to_thread(os.replace, tmp, path),
                lambda: asyncio.to_thread(path.unlink, missing_ok=True),
            )
        except OSError as exc:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise _storage_error("write", key, exc) from exc
        except BaseException:
            # Cancellation or the producer failing: leave nothing behind.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def _part_path(self, path: Path) -> Path:
        """Where an object is written before its rename: named after its writer."""
        writer = self.writer_id if _PART_FILE_WRITER.match(self.writer_id) else _NO_WRITER
        return path.with_name(f".{path.name}.{writer}.{uuid.uuid4().hex}.part")

    async def delete(self, key: str) -> None:
        try:
            path = self.path_of(key)
        except exceptions.ObjectNotFound:
            return
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def delete_many(self, keys: Sequence[str]) -> list[str]:
        def unlink_all() -> list[str]:
            failed = []
            for key in keys:
                try:
                    self.path_of(key).unlink(missing_ok=True)
                except exceptions.ObjectNotFound:
                    continue  # not a key this storage could hold
                except OSError:
                    failed.append(key)
            return failed

        return await asyncio.to_thread(unlink_all)

    async def list_partials(self) -> list[Partial]:
        def scan() -> list[Partial]:
            found = []
            for folder, _, names in os.walk(self.root):
                for name in names:
                    match = _PART_FILE.match(name) or _OLD_PART_FILE.match(name)
                    if match is None:
                        continue
                    path = Path(folder) / name
                    try:
                        mtime = path.stat().st_mtime
                    except FileNotFoundError:
                        continue  # renamed into place or removed meanwhile
                    writer = match.groupdict().get("writer")
                    relative = path.with_name(match.group("name")).relative_to(self.root)
                    found.append(
                        Partial(
                            key=relative.as_posix(),
                            ref=str(path.relative_to(self.root)),
                            writer=None if writer in (None, _NO_WRITER) else writer,
                            started_at=mtime,
                        )
                    )
            return found

        return await asyncio.to_thread(scan)

    async def discard_partial(self, partial: Partial) -> None:
        path = (self.root / partial.ref).resolve()
        if path.is_relative_to(self.root) and path.name.endswith(".part"):
            await asyncio.to_thread(path.unlink, missing_ok=True)

    # --- signed URLs -------------------------------------------------------------------

    def _signature(self, key: str, expires: int, filename: str) -> str:
        message = f"{key}\n{expires}\n{filename}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    async def signed_url(self, key: str, expires_in_s: int, filename: str) -> SignedUrl:
        validate_key(key)
        expires = int(self._clock()) + expires_in_s
        query = urlencode(
            {
                "expires": expires,
                "filename": filename,
                "sig": self._signature(key, expires, filename),
            }
        )
        return SignedUrl(url=f"{FILES_PREFIX}{quote(key)}?{query}", expires_at=expires)

    def verify(self, key: str, expires: str, filename: str, signature: str) -> Path:
        """Path of a signed request's object.

        Raises:
            exceptions.InvalidSignature: bad or expired signature.
            exceptions.ObjectNotFound: unsafe key.
        """
        path = self.path_of(key)
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 20):
            raise exceptions.InvalidSignature("malformed expiry")
        expires_at = int(expires)
        try:
            expected = self._signature(key, expires_at, filename).encode()
        except UnicodeEncodeError:  # undecodable bytes: no URL we signed carries them
            raise exceptions.InvalidSignature("malformed filename") from None
        # As bytes: compare_digest refuses str with non-ASCII characters.
        if not hmac.compare_digest(expected, signature.encode("utf-8", "surrogateescape")):
            raise exceptions.InvalidSignature("signature does not match")
        if expires_at < self._clock():
            raise exceptions.InvalidSignature("link expired")
        return path


#: Bytes read from a source at a time while bundling: each chunk costs a hand-over to
#: the hashing thread and back; 1 and 2 MiB bundled alike, 4 MiB at half the speed.
ZIP_CHUNK_BYTES = 1 << 20
#: Chunk buffers in turn: one being read and written while the others wait to be
#: hashed (memory: this many chunks, 4 MiB per bundle being written).
ZIP_BUFFERS = 4
#: Progress is reported after this many bytes at least.
PROGRESS_BYTES = 8 << 20


class _Stopped(Exception):
    """The bundle's job was stopped."""


def _zip_files(
    tmp: Path,
    sources: Sequence[tuple[ZipMember, Path]],
    stop: threading.Event,
    progress: ZipProgress,
) -> tuple[int, str]:
    """Write the archive of ``sources`` to ``tmp``; its size and SHA-256 (a thread).

    Each chunk is read once into one of ``ZIP_BUFFERS`` buffers for its CRC-32 (here)
    and SHA-256 (on a second thread), both without the GIL, and written from that
    buffer while it is still in the CPU's cache; a buffer is read into again only once
    its hash is done. ``copy_file_range`` instead of the write copies the same range
    again from the page cache: 0.72-0.80 s per GiB on ext4 here, against 0.34-0.39 s
    for the write, and the bundle ran 0.6x-0.7x as fast.
    """
    digest = hashlib.sha256()
    buffers = [bytearray(ZIP_CHUNK_BYTES) for _ in range(ZIP_BUFFERS)]
    hashed: list[concurrent.futures.Future[None] | None] = [None] * ZIP_BUFFERS
    last: concurrent.futures.Future[None] | None = None
    written = 0
    with (
        concurrent.futures.ThreadPoolExecutor(1, "longdl zip hash") as hasher,
        _create_private(tmp) as out,
        contextlib.ExitStack() as stack,
    ):
        out_fd = out.fileno()

        def emit(data: bytes | memoryview) -> None:
            nonlocal written, last
            last = hasher.submit(digest.update, data)
            _write_all(out_fd, data)
            written += len(data)

        writer = stack.enter_context(ZipWriter(emit))
        copied = reported = turn = 0
        for done, (member, source) in enumerate(sources):
            try:
                fh = source.open("rb", buffering=0)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
                raise exceptions.ObjectNotFound(member.key) from exc
            with fh:
                writer.begin(member.name, member.size_bytes)
                while True:
                    slot = turn % ZIP_BUFFERS
                    if (pending := hashed[slot]) is not None:
                        pending.result()  # that buffer's bytes are hashed: reuse it
                    if not (count := fh.readinto(buffers[slot])):
                        break
                    if stop.is_set():
                        raise _Stopped
                    chunk = memoryview(buffers[slot])[:count]
                    writer.write(chunk)  # emit(): hashed beside, written here
                    hashed[slot] = last
                    turn += 1
                    copied += count
                    if copied - reported >= PROGRESS_BYTES:
                        reported = copied
                        progress(done, copied)
                writer.end()
            progress(done + 1, copied)
        writer.close()
        if last is not None:
            last.result()
    return written, digest.hexdigest()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
