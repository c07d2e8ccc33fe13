"""Local folder storage with HMAC-signed, expiring URLs served by ``GET /files/{key}``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote, urlencode

from longdl import exceptions
from longdl.config import load_or_create_secret_file
from longdl.storage.base import ObjectInfo, SignedUrl, Storage, validate_key

FILES_PREFIX = "/files/"


def load_or_create_secret(path: Path) -> bytes:
    """The URL-signing secret kept at ``path`` (hex), created (mode 0600) the first time."""
    return bytes.fromhex(load_or_create_secret_file(path, lambda: secrets.token_bytes(32).hex()))


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
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

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
            raise exceptions.StorageUnavailable(str(exc)) from exc
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
            raise exceptions.StorageUnavailable(str(exc)) from exc
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
        path = self.path_of(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        size = 0
        try:
            fh = await asyncio.to_thread(tmp.open, "wb")
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(fh.write, chunk)
                    size += len(chunk)
            finally:
                fh.close()
            await asyncio.to_thread(os.replace, tmp, path)
        except OSError as exc:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise exceptions.StorageUnavailable(str(exc)) from exc
        except BaseException:
            # Cancellation or the producer failing: leave nothing behind.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(key=key, size_bytes=size)

    async def delete(self, key: str) -> None:
        try:
            path = self.path_of(key)
        except exceptions.ObjectNotFound:
            return
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
        try:
            expires_at = int(expires)
        except ValueError as exc:
            raise exceptions.InvalidSignature("malformed expiry") from exc
        expected = self._signature(key, expires_at, filename)
        if not hmac.compare_digest(expected, signature):
            raise exceptions.InvalidSignature("signature does not match")
        if expires_at < self._clock():
            raise exceptions.InvalidSignature("link expired")
        return self.path_of(key)
