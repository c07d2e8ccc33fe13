"""longdl: long-running download jobs that never hold an HTTP request open too long."""

from __future__ import annotations

__version__ = "0.1.0"
