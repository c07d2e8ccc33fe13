"""Named SQL statements and numbered migrations of each backend, read from ``sql/``.

``sql/<backend>/queries.sql`` holds statements under ``-- name: <name>`` headers (the
convention of aiosql and River's sqlc files); ``sql/<backend>/migrations/NNNN_*.sql``
are applied in number order.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$")
_SCAN = re.compile(r"^--\s*scan:\s*(.+)$")
_MIGRATION = re.compile(r"^(\d{4})_\w+\.sql$")


@dataclass(frozen=True)
class Query:
    """One named statement."""

    name: str
    sql: str
    #: Why a full scan is fine here, when the file says so; None: it must use an index.
    scan_ok: str | None = None


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str


@functools.cache
def queries(backend: str) -> dict[str, Query]:
    """The named statements of ``backend`` ("sqlite", "postgres")."""
    text = resources.files("longdl.store").joinpath("sql", backend, "queries.sql").read_text()
    found: dict[str, Query] = {}
    name: str | None = None
    scan: str | None = None
    lines: list[str] = []

    def done() -> None:
        if name is not None:
            sql = "\n".join(lines).strip().rstrip(";").strip()
            found[name] = Query(name, sql, scan)

    for line in text.splitlines():
        header = _NAME.match(line)
        if header:
            done()
            name, scan, lines = header.group(1), None, []
            continue
        if name is None:
            continue
        reason = _SCAN.match(line)
        if reason and not lines:
            scan = reason.group(1).strip()
        elif not line.lstrip().startswith("--"):
            lines.append(line)
    done()
    return found


@functools.cache
def migrations(backend: str) -> tuple[Migration, ...]:
    """The numbered migrations of ``backend``, in order."""
    folder = resources.files("longdl.store").joinpath("sql", backend, "migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text()))
    found.sort(key=lambda m: m.number)
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{backend} migrations are not numbered 1..n: {numbers}")
    return tuple(found)
