"""Calling listeners: one that raises is logged, and the others still run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable


def call_each(
    callbacks: Iterable[Callable[..., object]], *args: object, log: logging.Logger, what: str
) -> None:
    """Call every callback with ``args`` (over a copy: a callback may remove itself); one
    that raises is logged as ``"<what> failed"`` with its traceback."""
    for callback in list(callbacks):
        try:
            callback(*args)
        except Exception:
            log.exception("%s failed", what)
