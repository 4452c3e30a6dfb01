"""The server's event loop, instrumented to say how busy it is, and how the process shares
its core with it.

``new_event_loop()`` is a standard ``SelectorEventLoop`` whose selector records the time the
loop spends waiting for I/O. ``LoopLoad`` turns that into the fraction of wall time the loop
was busy (running callbacks, or waiting for the GIL while gRPC's threads hold it), or the
process's share of the cores it may use, whichever is higher. The hub uses it to batch harder
only when the server is saturated (see ``hub.Pacing``). The loop's own measure is needed
because process CPU time does not show a loop with one core's worth of work while gRPC's
threads run on another core; the CPU share is needed because with ``yield_helper_threads``
gRPC's threads do their work while the loop waits, which the loop would count as idle.

``yield_helper_threads()``, ``batch_grpc_wakeups()``, ``freeze_startup_heap()`` and
``Collector`` are for the serving process, once it has started (bench/README.md has the
measurements behind them). ``cancel_all()`` ends the server's background tasks when it stops.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable, Collection
from typing import Any

log = logging.getLogger("tsnetchat.loop")

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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A loop for ``asyncio.Runner(loop_factory=...)`` whose load ``LoopLoad`` can read."""
    sel = _TimedSelector()
    loop = asyncio.SelectorEventLoop(sel)
    _SELECTORS[loop] = sel
    return loop


class LoopLoad:
    """How busy (0..1) a loop made by ``new_event_loop`` is: its own busy fraction or the
    process's share of its cores, whichever is higher, over windows of ``window`` seconds,
    smoothed over about two windows. Reading it is cheap (a clock read); a new value is
    computed at most once per window. On any other loop it reads 0."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, window: float = 0.1) -> None:
        self._sel = _SELECTORS.get(loop)
        self.window = window
        self._t0 = time.perf_counter()
        self._idle0 = self._sel.idle if self._sel is not None else 0.0
        self._cpu0 = time.process_time()
        self.value = 0.0

    def __call__(self) -> float:
        if self._sel is None:
            return 0.0
        now = time.perf_counter()
        span = now - self._t0
        if span >= self.window:
            idle = self._sel.idle
            cpu = time.process_time()
            loop_busy = 1 - (idle - self._idle0) / span
            cpu_share = (cpu - self._cpu0) / (span * _cores())
            busy = max(0.0, min(1.0, max(loop_busy, cpu_share)))
            self.value = (self.value + busy) / 2
            self._t0, self._idle0, self._cpu0 = now, idle, cpu
        return self.value


def name_thread(name: str) -> None:
    """Give the calling thread a name the OS shows (``top -H``, /proc/*/task/*/comm; at
    most 15 bytes). Linux only; elsewhere nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def yield_helper_threads(keep: Collection[int] = ()) -> int:
    """Run every thread of this process except the calling one (the event loop's) and those
    in ``keep`` under SCHED_BATCH, and return how many were changed.

    gRPC hands each write to an EventEngine thread, and each completion to its poller thread,
    which wakes the loop. Under the normal policy every such wake-up preempts the loop: on one
    core that was about 65,000 context switches a second at 100,000 deliveries a second. A
    SCHED_BATCH thread never preempts on wake-up, so the helpers run when the loop waits, and
    do many writes and completions per turn (about 4,500 switches a second; 15% less CPU).
    Threads these helpers start later inherit the policy. Linux only; elsewhere, or where a
    seccomp filter forbids ``sched_setscheduler``, nothing changes and the reason is logged.

    ``keep`` is for threads on every message's path, which must run as soon as they are
    woken: the history's writer (and readers). As SCHED_BATCH, with other processes busy on
    the core, each commit waited for the writer's turn: p99 at 1,000 msg/s into 9 subscribers
    18.8 ms against round 1's 5.8; kept, 5.7 (five alternated runs each, 2026-11-22).
    """
    if not hasattr(os, "sched_setscheduler"):
        return 0
    me = threading.get_native_id()
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError as e:
        log.info("helper threads keep their scheduling: cannot list threads (%s)", e)
        return 0
    changed = 0
    for tid in tids:
        if tid == me or tid in keep:
            continue
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as e:
            log.warning("helper threads keep their scheduling: %s", e)
            return changed
        changed += 1
    return changed


def batch_grpc_wakeups(loop: asyncio.AbstractEventLoop) -> bool:
    """Let one turn of the loop take every completion gRPC has queued, not one.

    grpc.aio's poller thread writes one byte to a socket pair for each completion, and the
    loop's reader for it (``PollerCompletionQueue._handle_events``) reads one byte and then
    takes every completion queued. So after a burst of N completions the socket stayed
    readable for N-1 more turns of the loop, each a ``select`` and a ``recv`` that found
    nothing to do: 89,591 calls for about 90,000 completions at 100 msg/s into 1,000
    subscribers, against 1,732 with the bytes read in one go (2026-11-22). Here the reader is
    wrapped to read all but one waiting byte first; gRPC's own then reads the last.

    Returns False, and changes nothing, when gRPC's reader is not there in the shape this
    expects (another gRPC version, or no aio server in this loop yet).
    """
    sel = getattr(loop, "_selector", None)
    if sel is None:
        return False
    for key in list(sel.get_map().values()):
        handle = key.data[0] if isinstance(key.data, tuple) else None
        handle_events = getattr(handle, "_callback", None)
        method = handle_events.func if isinstance(handle_events, functools.partial) else (
            handle_events)  # (grpcio 1.85 registers a partial of the method)
        sock = key.fileobj
        if (handle_events is None or getattr(method, "__name__", "") != "_handle_events"
                or type(getattr(method, "__self__", None)).__name__ != "PollerCompletionQueue"
                or not isinstance(sock, socket.socket)):
            continue

        def on_readable(sock: socket.socket = sock,
                        handle_events: Callable[[], None] = handle_events) -> None:
            try:
                waiting = len(sock.recv(65536, socket.MSG_PEEK))
                if waiting > 1:
                    sock.recv(waiting - 1)
            except (BlockingIOError, InterruptedError):
                pass
            handle_events()

        loop.remove_reader(sock)
        loop.add_reader(sock, on_readable)
        return True
    return False


def freeze_startup_heap() -> None:
    """Move every object that exists now out of the garbage collector's sight.

    Everything built at startup (modules, gRPC and protobuf machinery) lives as long as the
    process, yet each full collection walked it again: about 40,000 objects and 9-12 ms with
    the loop stopped, several times a minute under load. Frozen, a full collection walks only
    what was made since: under 1 ms. Objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()


class Collector:
    """The garbage collector's settings for a server with many streams.

    Each open stream keeps about 75 objects the collector tracks (its task, coroutines,
    gRPC's call state): 750,000 at 10,000 subscribers. Measured with 10,000 (py-spy and a
    ``gc.callbacks`` timer, bench/README.md), the collector was a quarter to a third of the
    server's CPU while a room that size was busy, for two reasons:

    * Full collections walked all of them, 300 ms with the loop stopped, every second or two.
      Nearly all of them live as long as their stream, so after each full collection what
      survived is frozen (``gc.freeze``) and the next one walks only what was made since.
      Frozen objects are never collected as cycles (they are still freed when their last
      reference goes), so objects that end up in a cycle when their stream closes would be
      kept: every ``refresh`` seconds the freeze is undone and the next full collection walks
      everything once.
    * A young collection runs whenever 700 more tracked objects exist than at the last one. A
      write to 10,000 streams keeps several objects per stream alive until it completes, so
      young collections ran dozens of times per broadcast and promoted that in-flight state
      to the older generations (8 ms per middle collection). ``scale(streams)`` sets the
      threshold to ``per_stream`` objects per open stream (at least Python's 700): 2,100
      collections and 4.8 s of 14.7 s of CPU for 20 broadcasts became 8 and 0.2 s.

    When the number of streams has doubled (from 1,000 on), ``scale`` collects and freezes at
    once: the one full walk over the new streams' objects then happens while they connect,
    not in the middle of a broadcast. (Without it one of two runs of 20 broadcasts to 10,000
    had one take 1.5 s instead of 0.4 s; with it the slowest of both was 0.6 s. Measured
    2026-11-22 on a busy machine.)
    """

    def __init__(self, *, refresh: float = 600.0, per_stream: int = 10) -> None:
        self.refresh = refresh
        self.per_stream = per_stream
        self._thawed = time.monotonic()
        self._frozen_at_streams = 0
        self.frozen_after = 0  # full collections followed by a freeze (the tests read it)

    def install(self) -> None:
        gc.callbacks.append(self._after)

    def uninstall(self) -> None:
        if self._after in gc.callbacks:
            gc.callbacks.remove(self._after)

    def scale(self, streams: int) -> None:
        _, middle, full = gc.get_threshold()
        gc.set_threshold(max(700, self.per_stream * streams), middle, full)
        if streams >= max(1000, 2 * self._frozen_at_streams):
            self._frozen_at_streams = streams
            gc.collect()  # frozen by _after

    def _after(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        now = time.monotonic()
        if now - self._thawed >= self.refresh:
            gc.unfreeze()  # the next full collection walks everything once
            self._thawed = now
            return
        gc.freeze()
        self.frozen_after += 1


async def cancel_all(tasks: Collection[asyncio.Future[Any]], patience: float = 2.0) -> None:
    """Cancel ``tasks`` and return once each has ended, whatever it ended with. One still
    running ``patience`` seconds later is cancelled again, and the log says so: Python
    3.11's ``asyncio.wait_for`` returns what it waited for when that arrives together with a
    cancellation, dropping the cancellation, so a loop around it goes on (a cluster server's
    watch of the server list, woken by its own leaving the list as it stopped, kept stop
    waiting for ever: 2026-11-24). A cancellation of the caller is not swallowed (a
    ``suppress(CancelledError)`` around ``await task`` took it for the task's)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
        if pending:
            log.warning("%d task(s) still running %.0f s after being cancelled (%s); "
                        "cancelling again", len(pending), patience,
                        ", ".join(sorted(t.get_name() for t in pending
                                         if isinstance(t, asyncio.Task))))
    for t in tasks:  # (retrieved: no "exception was never retrieved" at exit)
        if not t.cancelled():
            t.exception()
