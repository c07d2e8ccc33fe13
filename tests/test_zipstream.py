"""The streaming ZIP writer: archives that standard readers open, however they end."""

from __future__ import annotations

import gc
import io
import sys
import zipfile

import pytest

from longdl import zipstream
from longdl.zipstream import ZipWriter


def _archive(writer: ZipWriter, entries: dict[str, bytes], chunk: int = 7) -> bytes:
    out = bytearray()
    for name, data in entries.items():
        out += writer.begin(name, len(data))
        for start in range(0, len(data), chunk):
            out += writer.write(data[start : start + chunk])
        out += writer.end()
    out += writer.close()
    return bytes(out)


@pytest.mark.parametrize("force_zip64", [False, True], ids=["zip", "zip64"])
def test_streamed_archive_reads_back(force_zip64: bool) -> None:
    entries = {"a.bin": b"x" * 100, "empty": b"", "b.bin": bytes(range(256))}
    data = _archive(ZipWriter(force_zip64=force_zip64), entries)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert {name: archive.read(name) for name in archive.namelist()} == entries
        stored = {info.compress_type for info in archive.infolist()}
        assert stored == {zipfile.ZIP_STORED}


class _Unseekable:
    """A file zipfile can write into but not seek back in, like the writer's own sink."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def tell(self) -> int:
        return len(self.data)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("fast_crc", [True, False], ids=["zlib-ng", "zipfile"])
@pytest.mark.parametrize("force_zip64", [False, True], ids=["zip", "zip64"])
def test_the_archive_is_the_one_zipfile_writes_itself(
    force_zip64: bool, fast_crc: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer counts each entry's CRC-32 and size itself (with zlib-ng, not through
    zipfile's ``write``), or, on a Python whose zipfile keeps them elsewhere, leaves them
    to zipfile: either way the bytes are exactly those zipfile writes on its own, data
    descriptors and central directory included."""
    assert zipstream.FAST_CRC  # this Python takes the fast path
    monkeypatch.setattr(zipstream, "FAST_CRC", fast_crc)
    entries = {"a.bin": bytes(range(256)) * 300, "empty": b"", "b.bin": b"\x00\xff" * 4099}
    ours = _archive(ZipWriter(force_zip64=force_zip64), entries, chunk=5000)
    with zipfile.ZipFile(io.BytesIO(ours)) as archive:
        date_time = archive.infolist()[0].date_time
    sink = _Unseekable()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as reference:  # type: ignore[arg-type]
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.file_size = len(data)
            info.external_attr = 0o644 << 16
            with reference.open(info, "w", force_zip64=force_zip64) as member:
                member.write(data)
    assert ours == bytes(sink.data)


def test_emit_gets_the_same_bytes_as_the_plain_archive() -> None:
    """With ``emit`` the writer hands over every byte as it comes, entry data as the
    very buffer it was given, and the archive is the same as the plain one."""
    entries = {"a.bin": b"hello world" * 50, "b.bin": b"zz"}
    plain = _archive(ZipWriter(), entries)
    out = bytearray()
    handed: list[bytes | memoryview] = []

    def emit(data: bytes | memoryview) -> None:
        handed.append(data)
        out.extend(data)

    writer = ZipWriter(emit)
    for name, data in entries.items():
        writer.begin(name, len(data))
        assert writer.write(data) == b""
        assert handed[-1] is data
        writer.end()
    writer.close()
    with zipfile.ZipFile(io.BytesIO(bytes(out))) as archive:
        assert archive.testzip() is None
        assert {name: archive.read(name) for name in archive.namelist()} == entries
    assert len(out) == len(plain)


def test_an_abandoned_archive_emits_nothing_more_and_raises_nothing_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bundle whose source fails: the writer goes quiet, and collecting it later does
    not try to finish the archive (which raised in the garbage collector)."""
    emitted: list[bytes] = []
    open_for_writes = True

    def emit(data: bytes | memoryview) -> None:
        if not open_for_writes:  # as the bundle's hashing thread, shut down by now
            raise RuntimeError("cannot schedule new futures after shutdown")
        emitted.append(bytes(data))

    with pytest.raises(RuntimeError, match="source failed"), ZipWriter(emit) as writer:
        writer.begin("half.bin", 10)
        writer.write(b"12345")
        raise RuntimeError("source failed")
    count = len(emitted)
    open_for_writes = False
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    del writer
    gc.collect()
    assert len(emitted) == count
    assert unraisable == []
