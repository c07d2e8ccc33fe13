"""Command line: ``longdl serve``, ``longdl seed``, and the client commands ``longdl get``
and ``longdl jobs`` (in :mod:`longdl.cli_client`).

Every setting of :class:`~longdl.config.Settings` is also a flag of ``serve`` and
``seed`` (``DOWNLOAD_DELAY_MIN_MS`` is ``--download-delay-min-ms``); flags win over
environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
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

import longdl
from longdl import cli_client, config
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


def run(app: web.Application, settings: Settings) -> None:
    """Serve ``app`` as ``longdl serve`` does (logging, SIGTERM handling, shutdown grace);
    applications with their own job kinds serve their app with this too."""
    _configure_logging(settings.log_level)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        # Open requests get the same grace as running jobs, at the same time (app.py), so a
        # stop takes about SHUTDOWN_GRACE_S in all, inside a container engine's 10 s.
        shutdown_timeout=settings.shutdown_grace_s,
        access_log=None,
        print=lambda text: logging.getLogger("longdl").info("%s", text.strip().replace("\n", " ")),
    )


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
    if args.command == "serve":
        return cmd_serve(settings)
    return cmd_seed(settings, args.file_ids)
