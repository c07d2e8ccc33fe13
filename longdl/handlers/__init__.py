"""Job kinds. ``download`` is built in; applications register their own handlers."""

from __future__ import annotations

from longdl.engine import Handler
from longdl.handlers import download


def builtin() -> dict[str, Handler]:
    """The handlers every longdl service has."""
    return {"download": download.run}


__all__ = ["builtin", "download"]
