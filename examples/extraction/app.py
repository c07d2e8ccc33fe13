"""A long data extraction as a longdl job: export a table of a SQLite database as CSV.

Run it::

    python examples/extraction/app.py --db orders.sqlite3 --demo-rows 200000

then ``POST /v1/exports {"table": "orders", "where": {"status": "shipped"}}`` answers 202
with a job id at once; the standard routes poll it (``/v1/download/status/{id}``) and
fetch the CSV (``/v1/download/{id}``).

What it shows:

- an application adds a job kind (:meth:`Exporter.run`) and its own route
  (:func:`create_export`) that validates the body, then queues the job with
  :func:`longdl.web.routes.submit_job` and answers with
  :func:`longdl.web.routes.accepted`;
- the table and column names a client sends are only looked up among the database's own
  tables and columns; SQL is built from those names, values are bound as parameters;
- rows are read in batches on aiosqlite's thread and streamed into storage, so memory
  stays flat for millions of rows; progress reports rows done out of the total.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import random
import re
import sqlite3
import sys
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from longdl import cli, exceptions
from longdl.app import create_app
from longdl.config import Settings
from longdl.engine import Artifact, JobContext
from longdl.models import ProblemFieldError
from longdl.storage import Storage
from longdl.web import openapi, problems, routes

log = logging.getLogger("longdl.examples.extraction")

#: The job kind this example registers.
KIND = "export"
CONTENT_TYPE = "text/csv; charset=utf-8"
#: Rows read per batch: big enough to keep the thread hops cheap, small enough to keep
#: memory flat and progress moving.
BATCH_ROWS = 5000

#: A filter value: SQLite's scalar types, bound as a parameter, never spliced into SQL.
Scalar = StrictStr | StrictInt | StrictFloat | None


class ExportRequest(BaseModel):
    """Body of ``POST /v1/exports``."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(min_length=1, max_length=128, description="A table of the database")
    where: dict[str, Scalar] = Field(
        default_factory=dict,
        max_length=16,
        description="Equality filters, column -> value, all of which must hold",
    )
    clientRequestId: str | None = Field(
        default=None, min_length=1, max_length=200, description="Idempotency key"
    )


class UnknownName(Exception):
    """A table or column the database does not have.

    Args:
        field: which part of the request named it (``table`` or ``where.<column>``).
        message: human text.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def quote_identifier(name: str) -> str:
    """``name`` as an SQLite identifier; only ever used on names read from the database."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Plan:
    """One export: a table of the database, its columns, and the equality filters."""

    table: str
    columns: tuple[str, ...]
    where: tuple[tuple[str, Scalar], ...]

    def _where_sql(self) -> str:
        if not self.where:
            return ""
        return " WHERE " + " AND ".join(
            # IS rather than =: a null filter value matches NULL.
            f"{quote_identifier(column)} IS ?"
            for column, _ in self.where
        )

    @property
    def params(self) -> list[Scalar]:
        return [value for _, value in self.where]

    def count_sql(self) -> str:
        return f"SELECT count(*) FROM {quote_identifier(self.table)}{self._where_sql()}"

    def select_sql(self) -> str:
        columns = ", ".join(quote_identifier(column) for column in self.columns)
        return f"SELECT {columns} FROM {quote_identifier(self.table)}{self._where_sql()}"


def csv_value(value: object) -> object:
    """What the CSV holds for an SQLite value: BLOBs as hex, NULL as an empty field."""
    if isinstance(value, bytes):
        return value.hex()
    return value


def safe_filename(table: str) -> str:
    """A download name for the table's CSV that needs no quoting anywhere."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", table).strip("._") or "export"
    return f"{stem[:100]}.csv"


class _Output:
    """What the CSV stream produced so far."""

    def __init__(self) -> None:
        self.rows = 0
        self.size_bytes = 0
        self._sha256 = hashlib.sha256()

    def add(self, chunk: bytes, rows: int = 0) -> None:
        self._sha256.update(chunk)
        self.size_bytes += len(chunk)
        self.rows += rows

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()


class Exporter:
    """Exports tables of one SQLite database as CSV; the route and the handler share it.

    Args:
        db_path: the database file, opened read-only.
        tables: the tables clients may export; every table of the database when None.
        batch_rows: rows read and written per step.
    """

    def __init__(
        self, db_path: Path, *, tables: Iterable[str] | None = None, batch_rows: int = BATCH_ROWS
    ) -> None:
        self.db_path = db_path
        self.allowed = frozenset(tables) if tables is not None else None
        self.batch_rows = batch_rows

    def connect(self) -> aiosqlite.Connection:
        """A read-only connection in autocommit mode (transactions are ours to open)."""
        uri = f"{self.db_path.resolve().as_uri()}?mode=ro"
        return aiosqlite.connect(uri, uri=True, isolation_level=None)

    async def describe(self, db: aiosqlite.Connection) -> dict[str, tuple[str, ...]]:
        """The exportable tables and their columns, as the database itself names them."""
        async with db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
        ) as cursor:
            names = [str(row[0]) for row in await cursor.fetchall()]
        tables: dict[str, tuple[str, ...]] = {}
        for name in names:
            if self.allowed is not None and name not in self.allowed:
                continue
            async with db.execute(
                "SELECT name FROM pragma_table_info(?) ORDER BY cid", (name,)
            ) as cursor:
                tables[name] = tuple(str(row[0]) for row in await cursor.fetchall())
        return tables

    async def plan(self, db: aiosqlite.Connection, table: str, where: Mapping[str, Scalar]) -> Plan:
        """Match the request's names against the database's own.

        Raises:
            UnknownName: the table or a filtered column does not exist (or is not allowed).
        """
        tables = await self.describe(db)
        columns = tables.get(table)
        if columns is None:
            choices = ", ".join(tables) or "none"
            raise UnknownName("table", f"No such table; this database has: {choices}")
        unknown = [column for column in where if column not in columns]
        if unknown:
            raise UnknownName(
                f"where.{unknown[0]}", f"No such column; {table} has: {', '.join(columns)}"
            )
        return Plan(table, columns, tuple(where.items()))

    async def validate(self, body: ExportRequest) -> Plan:
        """The plan for a request, or a 400 problem naming the bad field.

        Raises:
            problems.HTTPProblem: 400 for an unknown name, 503 when the database is down.
        """
        try:
            async with self.connect() as db:
                return await self.plan(db, body.table, body.where)
        except UnknownName as exc:
            raise problems.HTTPProblem(
                400,
                "The request is invalid",
                title="Invalid request",
                code="VALIDATION_ERROR",
                errors=[ProblemFieldError(field=exc.field, message=exc.message)],
            ) from exc
        except sqlite3.Error as exc:
            log.warning("database unavailable: %r", exc)
            raise problems.HTTPProblem(
                503, "The database is unavailable", code="DATABASE_UNAVAILABLE"
            ) from exc

    async def run(self, ctx: JobContext) -> Artifact:
        """The job: stream the table's rows as CSV into ``exports/{job_id}.csv``."""
        key = f"exports/{ctx.job_id}.csv"
        output = _Output()
        try:
            async with self.connect() as db:
                # One read transaction: the count and the rows come from one snapshot, so
                # "rows done of total" adds up even while another process writes.
                await db.execute("BEGIN")
                try:
                    plan = await self.plan(db, ctx.payload["table"], ctx.payload["where"])
                except UnknownName as exc:
                    # The schema changed since the request was accepted.
                    raise exceptions.JobFailed("EXPORT_INVALID", exc.message) from exc
                async with db.execute(plan.count_sql(), plan.params) as cursor:
                    row = await cursor.fetchone()
                total = int(row[0]) if row is not None else 0
                ctx.report(percent=0, message=f"Exporting {total:,} rows of {plan.table}")
                # Closed before the connection is, even when the write stops half way.
                async with contextlib.aclosing(
                    self._csv_chunks(db, plan, total, ctx, output)
                ) as chunks:
                    info = await ctx.storage.write(key, chunks, CONTENT_TYPE)
        except sqlite3.Error as exc:
            # Locked or briefly unreadable: worth another attempt, after a backoff.
            raise exceptions.JobFailed(
                "DATABASE_UNAVAILABLE", "The database could not be read", retryable=True
            ) from exc
        return Artifact(
            key=info.key,
            filename=safe_filename(plan.table),
            size_bytes=info.size_bytes,
            sha256=output.sha256,
            content_type=CONTENT_TYPE,
            details={"table": plan.table, "rows": output.rows},
        )

    async def _csv_chunks(
        self,
        db: aiosqlite.Connection,
        plan: Plan,
        total: int,
        ctx: JobContext,
        output: _Output,
    ) -> AsyncGenerator[bytes, None]:
        """The CSV, one chunk per batch of rows, reporting progress as it goes."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(plan.columns)
        async with db.execute(plan.select_sql(), plan.params) as cursor:
            while rows := list(await cursor.fetchmany(self.batch_rows)):
                writer.writerows([csv_value(value) for value in row] for row in rows)
                chunk = buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
                output.add(chunk, len(rows))
                ctx.report(
                    # 100 means stored; the engine says so once the write is done.
                    percent=min(99.0, 100.0 * output.rows / total) if total else 99.0,
                    message=f"Exported {output.rows:,} of {total:,} rows",
                    bytes_done=output.size_bytes,
                )
                yield chunk
        if not output.rows:  # an empty result is still a CSV: its header
            chunk = buffer.getvalue().encode()
            output.add(chunk)
            yield chunk


EXPORTER = web.AppKey("exporter", Exporter)


def request_hash(body: ExportRequest) -> str:
    """What identifies an export for idempotency: the same key with another body is 422."""
    canonical = json.dumps({"table": body.table, "where": body.where}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@openapi.doc(
    "Export a database table as CSV; answers at once with a job",
    tag="exports",
    description=(
        "Poll statusUrl, then fetch resultUrl: the job is followed, canceled and downloaded "
        "through the standard /v1/download routes."
    ),
    body=ExportRequest,
    params=[routes.IDEMPOTENCY_KEY],
    responses=routes.ACCEPTED,
)
async def create_export(request: web.Request) -> web.Response:
    """``POST /v1/exports``: validate against the database, then queue the job."""
    body = ExportRequest.model_validate_json(await problems.read_json(request))
    plan = await request.app[EXPORTER].validate(body)
    job, replayed = await routes.submit_job(
        request,
        KIND,
        # The database's own spelling of the names, not the request's text.
        {"table": plan.table, "where": dict(plan.where)},
        client_request_id=body.clientRequestId,
        request_hash=request_hash(body),
    )
    return routes.accepted(job, replayed)


def build_app(
    exporter: Exporter, settings: Settings | None = None, *, storage: Storage | None = None
) -> web.Application:
    """A longdl service with the ``export`` job kind and ``POST /v1/exports``."""
    app = create_app(settings, handlers={KIND: exporter.run}, storage=storage)
    app[EXPORTER] = exporter
    app.router.add_post("/v1/exports", create_export)
    return app


# --- a demo database -------------------------------------------------------------------

PRODUCTS = ("keyboard", "mouse", "monitor", "laptop stand", "usb-c hub", "webcam", "headset")
STATUSES = ("pending", "paid", "shipped", "delivered", "refunded")
NAMES = ("Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances")
SURNAMES = ("Lovelace", "Hopper", "Torvalds", "Liskov", "Thompson", "Hamilton", "Ritchie")


def _customers(count: int, rand: random.Random) -> Iterator[tuple[Any, ...]]:
    for customer_id in range(1, count + 1):
        name = f"{rand.choice(NAMES)} {rand.choice(SURNAMES)}"
        if customer_id % 97 == 0:  # names CSV must quote
            name = f'{name}, "Jr."'
        yield customer_id, name, f"customer{customer_id}@example.com"


def _orders(count: int, customers: int, rand: random.Random) -> Iterator[tuple[Any, ...]]:
    for order_id in range(1, count + 1):
        note = None if order_id % 5 else rand.choice(("gift", "leave at door", "call first\n"))
        yield (
            order_id,
            rand.randint(1, customers),
            rand.choice(PRODUCTS),
            rand.randint(1, 9),
            rand.randint(499, 149_999),
            rand.choice(STATUSES),
            note,
            f"2025-{rand.randint(1, 12):02d}-{rand.randint(1, 28):02d}",
        )


def create_demo_database(path: Path, orders: int, *, seed: int = 7) -> None:
    """Write a database with ``orders`` rows in ``orders`` and a ``customers`` table."""
    rand = random.Random(seed)
    customers = max(1, orders // 20)
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE customers (
                id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL);
            CREATE TABLE orders (
                id INTEGER PRIMARY KEY,
                customer_id INTEGER NOT NULL REFERENCES customers (id),
                product TEXT NOT NULL,
                quantity INTEGER NOT NULL,
                unit_price_cents INTEGER NOT NULL,
                status TEXT NOT NULL,
                note TEXT,
                ordered_on TEXT NOT NULL);
            """
        )
        db.executemany("INSERT INTO customers VALUES (?, ?, ?)", _customers(customers, rand))
        db.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?, ?)", _orders(orders, customers, rand)
        )
    db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A longdl service exporting tables of a SQLite database as CSV "
        "(settings from the environment, as longdl serve: PORT, DATA_DIR, ...)."
    )
    parser.add_argument("--db", type=Path, required=True, help="the SQLite database")
    parser.add_argument(
        "--demo-rows",
        type=int,
        metavar="N",
        help="first create --db with N demo orders, unless the file exists",
    )
    parser.add_argument("--tables", help="comma-separated tables clients may export (all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.demo_rows is not None and not args.db.exists():
        create_demo_database(args.db, args.demo_rows)
        log.info("created %s with %d orders", args.db, args.demo_rows)
    if not args.db.is_file():
        print(f"no database at {args.db} (add --demo-rows 200000 to create one)", file=sys.stderr)
        return 2
    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else None
    settings = Settings()
    app = build_app(Exporter(args.db, tables=tables), settings)
    cli.run(app, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
