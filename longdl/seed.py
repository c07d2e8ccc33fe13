"""Demo source files: every multiple of 7 from 70000 to 70700, deterministic content."""

from __future__ import annotations

import random
from collections.abc import Iterable

from longdl.handlers.download import source_key
from longdl.storage import Storage

DEMO_FILE_IDS = tuple(range(70_000, 70_701, 7))


def demo_size_bytes(file_id: int) -> int:
    """A size from 4 KiB to 4 MiB (plus a little), the same for the same id."""
    index = (file_id - 70_000) // 7
    return int(2 ** (12 + index % 11) + (file_id * 7919) % 4096)


def demo_content(file_id: int) -> bytes:
    """The file's bytes: a pseudo-random stream seeded by its id."""
    return random.Random(file_id).randbytes(demo_size_bytes(file_id))


async def seed(storage: Storage, file_ids: Iterable[int] = DEMO_FILE_IDS) -> list[int]:
    """Write the demo files missing from ``storage``; return the ids written."""
    written = []
    for file_id in file_ids:
        key = source_key(file_id)
        info = await storage.head(key)
        if info is not None and info.size_bytes == demo_size_bytes(file_id):
            continue
        await storage.write_bytes(key, demo_content(file_id), "application/zip")
        written.append(file_id)
    return written
