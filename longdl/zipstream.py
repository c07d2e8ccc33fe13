"""Stream a ZIP archive (entries stored, not recompressed) with flat memory use."""

from __future__ import annotations

import time
import zipfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO, cast

ZIP64_THRESHOLD_BYTES = 2**31


class _Sink:
    """A write-only, non-seekable file zipfile writes into; drained after each write.

    Having ``tell`` but no ``seek`` makes zipfile write data descriptors instead of
    seeking back, which is what lets the archive stream.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._offset = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


@dataclass(frozen=True)
class Entry:
    """One file of the archive: its name, its expected size and its bytes."""

    name: str
    size_bytes: int
    chunks: Callable[[], AsyncIterable[bytes]]


async def zip_entries(
    entries: list[Entry], on_bytes: Callable[[int], None] | None = None
) -> AsyncIterator[bytes]:
    """Yield the archive of ``entries`` chunk by chunk.

    Args:
        entries: files in archive order.
        on_bytes: called with the count of source bytes consumed after each chunk.
    """
    sink = _Sink()
    date_time = time.gmtime()[:6]
    writable = cast(IO[bytes], sink)
    with zipfile.ZipFile(writable, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for entry in entries:
            info = zipfile.ZipInfo(entry.name, date_time=date_time)
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = entry.size_bytes
            info.external_attr = 0o644 << 16
            force_zip64 = entry.size_bytes >= ZIP64_THRESHOLD_BYTES
            with archive.open(info, "w", force_zip64=force_zip64) as member:
                async for chunk in entry.chunks():
                    member.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    if data := sink.drain():
                        yield data
            if data := sink.drain():
                yield data
    if data := sink.drain():
        yield data
