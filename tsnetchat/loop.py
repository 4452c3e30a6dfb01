"""The server's event loop, instrumented to say how busy it is.

``new_event_loop()`` is a standard ``SelectorEventLoop`` whose selector records the time the
loop spends waiting for I/O. ``LoopLoad`` turns that into the fraction of wall time the loop
was busy (running callbacks, or waiting for the GIL while gRPC's threads hold it). The hub
uses it to batch harder only when the server is saturated (see ``hub.Pacing``): a measure of
the loop itself, because process CPU time does not show a loop that has one core's worth of
work while gRPC's poller thread runs on another.
"""

from __future__ import annotations

import asyncio
import selectors
import time
import weakref
from typing import Any

_SELECTORS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _TimedSelector] = (
    weakref.WeakKeyDictionary())


class _TimedSelector(selectors.DefaultSelector):
    """Counts time blocked in ``select``. A select with timeout 0 is the loop polling
    between callbacks it already has, so it counts as busy."""

    def __init__(self) -> None:
        super().__init__()
        self.idle = 0.0

    def select(self, timeout: float | None = None) -> Any:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        t = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            self.idle += time.perf_counter() - t


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A loop for ``asyncio.Runner(loop_factory=...)`` whose load ``LoopLoad`` can read."""
    sel = _TimedSelector()
    loop = asyncio.SelectorEventLoop(sel)
    _SELECTORS[loop] = sel
    return loop


class LoopLoad:
    """The busy fraction (0..1) of a loop made by ``new_event_loop``, over windows of
    ``window`` seconds, smoothed over about two windows. Reading it is cheap (a clock read);
    a new value is computed at most once per window. On any other loop it reads 0."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, window: float = 0.1) -> None:
        self._sel = _SELECTORS.get(loop)
        self.window = window
        self._t0 = time.perf_counter()
        self._idle0 = self._sel.idle if self._sel is not None else 0.0
        self.value = 0.0

    def __call__(self) -> float:
        if self._sel is None:
            return 0.0
        now = time.perf_counter()
        span = now - self._t0
        if span >= self.window:
            idle = self._sel.idle
            busy = max(0.0, min(1.0, 1 - (idle - self._idle0) / span))
            self.value = (self.value + busy) / 2
            self._t0, self._idle0 = now, idle
        return self.value
