"""Random ids: job ids (a capability in open mode, so from the OS's CSPRNG) and request ids.

``str(uuid.uuid4())`` builds a UUID object to print it, 2 us a call, and asks the kernel
for 16 bytes each time; every job and every request needs an id, so job ids take their
bytes from a buffer of ``os.urandom`` refilled 4 KiB at a time, and request ids (which
only need to be unique) from ``random``.
"""

from __future__ import annotations

import os
import random

#: The variant nibble of an RFC 4122 UUID: 10xx.
_VARIANT = "89ab"
_REFILL_BYTES = 4096
_pool = bytearray()


def _format(h: str) -> str:
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def uuid4() -> str:
    """A random (version 4) UUID in its canonical text form, from ``os.urandom``: fit to
    be a capability (unguessable)."""
    global _pool
    if len(_pool) < 16:
        _pool = bytearray(os.urandom(_REFILL_BYTES))
    chunk = bytes(_pool[-16:])
    del _pool[-16:]
    return _format(chunk.hex())


def request_id() -> str:
    """A version 4 UUID for a request id: unique, not secret."""
    return _format(f"{random.getrandbits(128):032x}")
