"""Many timeouts on one timer: the deadlines of requests, the waits of held long-polls and
event streams.

``asyncio.timeout`` schedules and cancels a timer per use (7 % of a status poll's time
under wrk) and keeps a timeout object, a timer and a coroutine frame per held request.
Here a key enters the set of the tick its time falls in and leaves it when discarded: a
dict and a set, what the keys waiting hold and no more (a heap keeps each entry until its
time comes, the last REQUEST_TIMEOUT_MS of traffic under load). A tick every TICK_S
expires the keys of the ticks that passed: never early, at most about two ticks late.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Timeouts(Generic[K]):
    """Calls ``expire(key)`` once a key's time has passed, unless it was discarded first."""

    TICK_S = 0.1

    def __init__(self, expire: Callable[[K], None]) -> None:
        self._expire = expire
        #: Key -> the tick its time falls in.
        self._due: dict[K, int] = {}
        self._ticks: dict[int, set[K]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Keys waiting for their time."""
        return len(self._due)

    def add(self, key: K, delay_s: float, loop: asyncio.AbstractEventLoop) -> None:
        """Expire ``key`` ``delay_s`` from now (for a key already waiting, the new time
        replaces the old)."""
        self.discard(key)
        tick = math.ceil((loop.time() + delay_s) / self.TICK_S)
        self._due[key] = tick
        keys = self._ticks.get(tick)
        if keys is None:
            keys = self._ticks[tick] = set()
        keys.add(key)
        if self._timer is None:
            self._timer = loop.call_later(self.TICK_S, self._tick, loop)

    def discard(self, key: K) -> None:
        """Forget ``key`` (its wait ended another way)."""
        tick = self._due.pop(key, None)
        if tick is not None:
            keys = self._ticks[tick]
            keys.discard(key)
            if not keys:
                del self._ticks[tick]

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time() / self.TICK_S
        # One set per TICK_S of the longest timeout: a few hundred keys at most.
        for tick in [tick for tick in self._ticks if tick <= now]:
            for key in self._ticks.pop(tick):
                del self._due[key]
                self._expire(key)
        self._timer = loop.call_later(self.TICK_S, self._tick, loop) if self._ticks else None
