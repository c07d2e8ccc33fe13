"""Stream a ZIP archive (entries stored, not recompressed) with flat memory use.

:class:`ZipWriter` turns entries into archive bytes as they come, the standard library's
``zipfile`` doing the format (data descriptors, ZIP64, the central directory); each call
returns the bytes to append. :func:`zip_entries` drives it from async sources; local
storage drives it from files on a thread of its own (see ``LocalStorage.write_zip``).
"""

from __future__ import annotations

import contextlib
import io
import time
import zipfile
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import IO, Any, cast

from zlib_ng.zlib_ng import crc32

ZIP64_THRESHOLD_BYTES = 2**31


def _writer_keeps_counts() -> bool:
    """Whether zipfile's entry writer keeps its running CRC-32 and size where
    :meth:`ZipWriter._feed` adds to them (CPython's does)."""
    with zipfile.ZipFile(io.BytesIO(), "w") as archive, archive.open("probe", "w") as member:
        return hasattr(member, "_crc") and hasattr(member, "_file_size")


#: Entries get their CRC-32 from zlib-ng (see :meth:`ZipWriter._feed`); False: through
#: zipfile's own ``write``, with zlib's.
FAST_CRC = _writer_keeps_counts()


class _Sink:
    """A write-only, non-seekable file zipfile writes into.

    Having ``tell`` but no ``seek`` makes zipfile write data descriptors instead of
    seeking back, which is what lets the archive stream. With ``emit`` every write goes
    straight to it, entry data as the very buffer passed to :meth:`ZipWriter.write`
    (no copy); without, writes are kept (copied) until drained.
    """

    def __init__(self, emit: Callable[[bytes | memoryview], object] | None) -> None:
        self._parts: list[bytes] = []
        self._offset = 0
        self._emit = emit
        #: Set once the archive is abandoned: nothing more is emitted.
        self.silent = False

    def write(self, data: bytes | memoryview) -> int:
        if self.silent:
            pass
        elif self._emit is not None:
            self._emit(data)
        else:
            self._parts.append(bytes(data))
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        if len(self._parts) == 1:
            return self._parts.pop()
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class ZipWriter:
    """The bytes of an archive of stored entries, entry by entry.

    Call :meth:`begin`, :meth:`write` (any number of times) and :meth:`end` for each
    entry, then :meth:`close`; each returns the bytes that follow in the archive, or,
    given ``emit``, hands them to it as they come (and returns ``b""``).
    """

    def __init__(
        self,
        emit: Callable[[bytes | memoryview], object] | None = None,
        *,
        force_zip64: bool = False,
    ) -> None:
        self._sink = _Sink(emit)
        self._archive = zipfile.ZipFile(
            cast(IO[bytes], self._sink), "w", zipfile.ZIP_STORED, allowZip64=True
        )
        self._member: IO[bytes] | None = None
        self._date_time = time.gmtime()[:6]
        self._force_zip64 = force_zip64

    def begin(self, name: str, size_bytes: int) -> bytes:
        info = zipfile.ZipInfo(name, date_time=self._date_time)
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size_bytes
        info.external_attr = 0o644 << 16
        zip64 = self._force_zip64 or size_bytes >= ZIP64_THRESHOLD_BYTES
        self._member = self._archive.open(info, "w", force_zip64=zip64)
        return self._sink.drain()

    def write(self, data: bytes | memoryview) -> bytes:
        self._feed(data)
        return self._sink.drain()

    def _feed(self, data: bytes | memoryview) -> None:
        """Take ``data`` into the entry (its CRC-32 and size) and hand it to the sink.

        zipfile's entry writer would compute the CRC with zlib's: 4 GB/s here where
        zlib-ng's does about 30, a quarter of a local bundle's time (P5). zipfile cannot
        be handed a CRC, so this adds to the two counters its writer closes the entry
        with (a stored entry has no others); where a Python has them no more
        (:data:`FAST_CRC`), the data goes through zipfile's own ``write``."""
        assert self._member is not None, "begin() an entry first"
        if not FAST_CRC:
            self._member.write(data)
            return
        member = cast(Any, self._member)
        member._crc = crc32(data, member._crc)
        member._file_size += len(data)
        self._sink.write(data)

    def end(self) -> bytes:
        assert self._member is not None, "begin() an entry first"
        self._member.close()
        self._member = None
        return self._sink.drain()

    def close(self) -> bytes:
        self._archive.close()
        return self._sink.drain()

    def abandon(self) -> None:
        """Drop an archive left unfinished (its bytes are not wanted): nothing more is
        emitted, and nothing is left for the garbage collector to finish."""
        self._sink.silent = True
        if self._member is not None:
            self._member.close()
            self._member = None
        self._archive.close()

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            self.abandon()


@dataclass(frozen=True)
class Entry:
    """One file of the archive: its name, its expected size and its bytes."""

    name: str
    size_bytes: int
    #: Its bytes, as an async generator: closed as soon as the archive is done with it
    #: (a failing consumer included), so a source releases what it holds (an S3 body).
    chunks: Callable[[], AsyncGenerator[bytes, None]]


async def zip_entries(entries: list[Entry]) -> AsyncGenerator[bytes, None]:
    """Yield the archive of ``entries`` (files in archive order) chunk by chunk; a source
    that fails, or a consumer that stops, abandons it. A consumer that stops must close
    this generator (``contextlib.aclosing``): left to the garbage collector, the archive
    may be collected before the generator is closed, and zipfile raises from its
    finalizer."""
    with ZipWriter() as writer:
        for entry in entries:
            if data := writer.begin(entry.name, entry.size_bytes):
                yield data
            async with contextlib.aclosing(entry.chunks()) as chunks:
                async for chunk in chunks:
                    if data := writer.write(chunk):
                        yield data
            if data := writer.end():
                yield data
        if data := writer.close():
            yield data
