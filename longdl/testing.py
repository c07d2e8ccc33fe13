"""Test twins shipped with the package: wrap a real backend to inject failures."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence

from longdl import exceptions
from longdl.storage import ObjectInfo, Partial, SignedUrl, Storage


class FlakyStorage(Storage):
    """A real storage whose next ``failures`` calls of ``methods`` raise a transient error.

    Everything else goes to ``inner`` untouched, so the code under test still talks to a
    real backend.
    """

    def __init__(
        self,
        inner: Storage,
        failures: int = 1,
        methods: tuple[str, ...] = ("head", "read", "write"),
    ) -> None:
        self.inner = inner
        self.name = f"flaky-{inner.name}"
        self.failures = failures
        self.methods = methods
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if method in self.methods and self.failures > 0:
            self.failures -= 1
            raise exceptions.StorageUnavailable(f"injected failure in {method}")

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def check(self) -> None:
        self._maybe_fail("check")
        await self.inner.check()

    async def head(self, key: str) -> ObjectInfo | None:
        self._maybe_fail("head")
        return await self.inner.head(key)

    async def read(self, key: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        self._maybe_fail("read")
        async for chunk in self.inner.read(key, chunk_bytes):
            yield chunk

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        self._maybe_fail("write")
        return await self.inner.write(key, chunks, content_type)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def signed_url(self, key: str, expires_in_s: int, filename: str) -> SignedUrl:
        return await self.inner.signed_url(key, expires_in_s, filename)

    # write_zip is the generic one of Storage: it reads and writes through this twin.

    async def delete_many(self, keys: Sequence[str]) -> list[str]:
        return await self.inner.delete_many(keys)

    async def list_partials(self) -> list[Partial]:
        return await self.inner.list_partials()

    async def discard_partial(self, partial: Partial) -> None:
        await self.inner.discard_partial(partial)

    @property
    def writer_id(self) -> str:
        return self.inner.writer_id

    @writer_id.setter
    def writer_id(self, value: str) -> None:
        self.inner.writer_id = value

    def __getattr__(self, name: str) -> object:
        # Backend-specific helpers (e.g. LocalStorage.verify) stay reachable.
        return getattr(self.inner, name)
