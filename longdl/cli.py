"""Command line: ``longdl serve``, ``longdl seed``, and the client commands ``longdl get``
and ``longdl jobs`` (in :mod:`longdl.cli_client`).

Every setting of :class:`~longdl.config.Settings` is also a flag of ``serve`` and
``seed`` (``DOWNLOAD_DELAY_MIN_MS`` is ``--download-delay-min-ms``); flags win over
environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

import longdl
from longdl import cli_client, config, exceptions
from longdl import storage as storage_backends
from longdl.config import Settings, check_replica_secrets
from longdl.seed import DEMO_FILE_IDS, seed


def _flag_type(annotation: Any) -> Any:
    """argparse conversion for a settings field (strings for lists and paths)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else str
    if annotation is bool:
        return _parse_bool
    if annotation in (int, float):
        return annotation
    return str


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also an environment variable)")
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        group.add_argument(
            flag,
            dest=f"setting_{name}",
            type=_flag_type(info.annotation),
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=info.description,
        )


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_")
    }
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longdl", description="Long-running download jobs behind proxies and tunnels."
    )
    parser.add_argument("--version", action="version", version=f"longdl {longdl.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service")
    add_settings_flags(serve)
    seed_cmd = commands.add_parser("seed", help="write the demo source files into storage")
    seed_cmd.add_argument(
        "file_ids", nargs="*", type=int, help="ids to write (default: the demo set)"
    )
    add_settings_flags(seed_cmd)
    cli_client.add_commands(commands)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    http_log = logging.getLogger(HTTP_LOGGER)
    if not any(isinstance(f, ClientErrorsInOneLine) for f in http_log.filters):
        http_log.addFilter(ClientErrorsInOneLine())


#: The logger aiohttp's connection handlers report to (``aiohttp.server`` otherwise).
HTTP_LOGGER = "longdl.http"


class ClientErrorsInOneLine(logging.Filter):
    """aiohttp answers a malformed request (bad bytes in the request line or a header)
    with a 400 itself, and logs it at ERROR with a traceback. It is the client's
    mistake, not ours: keep it as one INFO line, so a traceback in the log always means
    a bug. The same for a request body that fails to decode (a plain body sent as gzip,
    say): aiohttp logs it again as it drains the body after longdl's 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError):
            exc = exc.__cause__ or exc.__context__
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            reason = (exc.message or type(exc).__name__).strip().splitlines()[0]
            record.msg = f"{record.getMessage()}: {exc.code or 400} {reason!r}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


#: Seconds aiohttp keeps reading (and dropping) a request body it did not need after the
#: answer went out; its default of 10 lets a slow sender hold the connection longer.
LINGERING_S = 2.0
#: How long a connection refused over MAX_CONNECTIONS may take to read its 503.
REFUSED_GRACE_S = 1.0
#: Net new objects between young garbage collections (Python's default: 700). Requests in
#: flight hold a few hundred objects each, so at 700 a burst of initiates made about 50
#: young collections a second that found no garbage (3 % of the event loop's time). The
#: price is a larger middle generation: its collections while thousands of held
#: connections open take up to about 90 ms, against 15 ms; at 700 they came with full
#: collections of up to 0.6 s, and took six times as long in all.
GC_YOUNG_THRESHOLD = 10_000

log = logging.getLogger("longdl")


def run(app: web.Application, settings: Settings) -> None:
    """Serve ``app`` as ``longdl serve`` does (logging, SIGTERM handling, shutdown grace,
    connection limits); applications with their own job kinds serve their app with this
    too.

    This is ``web.run_app``'s loop handling, with a listening site of our own: aiohttp has
    no setting for a connection cap. SIGTERM or SIGINT stop it gracefully.
    """
    _configure_logging(settings.log_level)
    loop = asyncio.new_event_loop()
    main_task = loop.create_task(_serve(app, settings), name="longdl serve")
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main_task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            # Cancel the server first, so the app's cleanup (the engine's grace for
            # running jobs) runs while every other task is still alive.
            if not main_task.done():
                main_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main_task)
        finally:
            others = asyncio.all_tasks(loop)
            for task in others:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*others, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _serve(app: web.Application, settings: Settings) -> None:
    runner = web.AppRunner(
        app,
        handle_signals=True,
        # Open requests get the same grace as running jobs, at the same time (app.py), so a
        # stop takes about SHUTDOWN_GRACE_S in all, inside a container engine's 10 s.
        shutdown_timeout=settings.shutdown_grace_s,
        access_log=None,
        keepalive_timeout=settings.http_keepalive_s,
        lingering_time=LINGERING_S,
        logger=logging.getLogger(HTTP_LOGGER),
    )
    try:
        # Inside the try: a resource that fails to open (a refused secret) must still
        # close the ones opened before it, or their threads keep the process alive.
        await runner.setup()
        _settle_heap()
        site = CappedSite(runner, settings.host, settings.port, settings.max_connections)
        await site.start()
        log.info(
            "======== Running on %s ======== max_connections=%d keepalive_s=%g",
            site.name,
            settings.max_connections,
            settings.http_keepalive_s,
        )
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        await runner.cleanup()


def _settle_heap() -> None:
    """Tune the garbage collector for serving, once start-up is done.

    What start-up made (modules, the app, its routes, schemas and settings) lives as long
    as the process: frozen, full collections no longer walk it. Under a burst of
    initiates they took 50 ms each, a pause every request in flight waited out; now
    3 ms. Objects frozen can still be freed by reference counting, not by a collection.
    Only here, where longdl owns the process: an app embedding longdl's keeps its own
    collector settings.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


_OVER_CAPACITY_BODY = (
    b'{"type":"https://longdl.dev/problems/too-many-connections",'
    b'"title":"Service Unavailable","status":503,"code":"TOO_MANY_CONNECTIONS",'
    b'"detail":"The service has MAX_CONNECTIONS open connections; try again"}'
)
#: What a connection over MAX_CONNECTIONS gets before it is closed.
OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/problem+json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_OVER_CAPACITY_BODY)
) + _OVER_CAPACITY_BODY


class _Refused(asyncio.Protocol):
    """A connection over the cap: answer 503, stop sending, drop whatever it sends, and
    close once the client does (or after REFUSED_GRACE_S)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(OVER_CAPACITY)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSED_GRACE_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # its request: not read, not answered

    def eof_received(self) -> bool:
        return False  # close


class CappedSite(web.BaseSite):
    """A TCP site that serves at most ``max_connections`` connections at once; each one
    beyond gets a 503 problem and is closed, so idle or slow clients cannot take every
    file descriptor."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, max_connections: int) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._max_connections = max_connections

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "start the site after runner.setup()"

        def protocol() -> asyncio.Protocol:
            if len(server.connections) >= self._max_connections:
                return _Refused()
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(protocol, self._host, self._port)


def data_dir_problem(path: Path) -> str | None:
    """Why this process cannot keep its files in DATA_DIR ``path``, or None if it can.

    Checked at start so a bind mount owned by someone else is a one-line message that
    says what to change, not a traceback from deep inside SQLite.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".longdl-write-test-"):
            pass
    except OSError as exc:
        uid = os.getuid()
        return (
            f"DATA_DIR {path} is not writable by this process (uid {uid}): {exc.strerror}. "
            f"Give uid {uid} the folder (chown -R {uid} on the host, for a bind mount) "
            "or point DATA_DIR at a writable one."
        )
    return None


def writes_data_dir(settings: Settings, command: str) -> bool:
    """Whether ``command`` keeps files in DATA_DIR: local storage (and its signing key),
    and for serve the SQLite store or a generated webhook secret."""
    if settings.storage_backend == "local":
        return True
    return command == "serve" and (not settings.database_url or not settings.webhook_secret)


def cmd_serve(settings: Settings) -> int:
    from longdl.app import create_app

    try:
        check_replica_secrets(settings)
    except ValueError as exc:
        print(f"longdl: {exc}", file=sys.stderr)
        return 2
    run(create_app(settings), settings)
    return 0


async def _seed(settings: Settings, file_ids: Sequence[int]) -> list[int]:
    backend = storage_backends.from_settings(settings)
    await backend.open()
    try:
        return await seed(backend, file_ids)
    finally:
        await backend.close()


def cmd_seed(settings: Settings, file_ids: Sequence[int]) -> int:
    written = asyncio.run(_seed(settings, file_ids or DEMO_FILE_IDS))
    total = len(file_ids or DEMO_FILE_IDS)
    print(f"seeded {len(written)} new file(s), {total - len(written)} already present")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in cli_client.COMMANDS:
        return cli_client.run(args)
    try:
        settings = settings_from(args)
    except pydantic.ValidationError as exc:  # show what to fix, without a traceback
        print(f"longdl: invalid settings:\n{config.describe_error(exc)}", file=sys.stderr)
        return 2
    if writes_data_dir(settings, args.command):
        problem = data_dir_problem(settings.data_dir)
        if problem is not None:
            print(f"longdl: {problem}", file=sys.stderr)
            return 2
    try:
        if args.command == "serve":
            return cmd_serve(settings)
        return cmd_seed(settings, args.file_ids)
    except exceptions.InvalidSecret as exc:  # found at start-up, before the port is bound
        print(f"longdl: {exc}", file=sys.stderr)
        return 2
    except exceptions.StoreUnavailable as exc:  # still away after the start-up wait
        print(f"longdl: the database is unavailable: {exc}", file=sys.stderr)
        return 1
