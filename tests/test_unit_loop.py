"""The event loop's load meter and the serving process's tuning."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

import pytest

from tsnetchat.loop import (
    Collector,
    LoopLoad,
    batch_grpc_wakeups,
    cancel_all,
    freeze_startup_heap,
    new_event_loop,
    yield_helper_threads,
)


def test_the_loop_load_is_low_when_waiting_and_high_when_running_callbacks() -> None:
    async def scenario() -> tuple[float, float]:
        load = LoopLoad(asyncio.get_running_loop(), window=0.02)
        for _ in range(10):  # waiting: the loop sits in select
            await asyncio.sleep(0.02)
            load()
        waiting = load()
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:  # working: callbacks back to back
            time.sleep(0.002)
            await asyncio.sleep(0)
            load()
        return waiting, load()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        waiting, working = runner.run(scenario())
    assert waiting < 0.3
    assert working > 0.8


def test_the_loop_load_counts_cpu_the_other_threads_use_while_the_loop_waits() -> None:
    # With helper threads that yield to the loop (yield_helper_threads), gRPC's threads do
    # their work while the loop sits in select: the loop's own measure reads idle.
    stop = threading.Event()

    def burn() -> None:
        block = b"x" * 1_000_000
        while not stop.is_set():
            hashlib.sha256(block).digest()  # releases the GIL: pure CPU beside the loop

    async def scenario() -> tuple[float, float]:
        load = LoopLoad(asyncio.get_running_loop(), window=0.02)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(10):
            await asyncio.sleep(0.02)
            load()
        # What this process really got of its one core: on a loaded machine less than all.
        got = (time.process_time() - cpu0) / (time.perf_counter() - t0)
        return load(), got

    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this thread, so the loop's share is of one core
    helper = threading.Thread(target=burn)
    helper.start()
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            for _ in range(5):  # other processes may starve this one for a moment
                reading, got = runner.run(scenario())
                if got > 0.2:
                    break
        # The loop slept the whole time, so its own measure reads idle; the load follows the
        # CPU the helper used (the smoothing lags a little behind).
        assert got > 0.2, f"this process got only {got:.0%} of a core; cannot tell"
        assert reading > 0.6 * got, (reading, got)
    finally:
        stop.set()
        helper.join()
        os.sched_setaffinity(0, allowed)


def test_helper_threads_yield_to_the_loop_thread_and_those_kept_which_keep_their_policy(
        ) -> None:
    # In a child: the policy applies to every thread of the process it runs in.
    script = """
import os, threading
from tsnetchat.loop import yield_helper_threads
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(2)]
for t in threads:
    t.start()
helper, kept = threads
changed = yield_helper_threads(keep={kept.native_id})
print(changed, os.sched_getscheduler(helper.native_id) == os.SCHED_BATCH,
      os.sched_getscheduler(kept.native_id) == os.SCHED_OTHER,
      os.sched_getscheduler(0) == os.SCHED_OTHER)
stop.set()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    assert int(out[0]) >= 1
    assert out[1:] == ["True", "True", "True"]


def test_where_the_policy_cannot_be_set_the_server_says_so_and_carries_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def forbidden(*_: Any) -> None:  # as under a seccomp filter without sched_setscheduler
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", forbidden)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        assert yield_helper_threads() == 0
    finally:
        stop.set()
        helper.join()
    assert "helper threads keep their scheduling: [Errno 1] Operation not permitted" \
        in caplog.text


class Node:
    ref: object = None


def cycle() -> weakref.ref[Node]:
    """Garbage only the collector can free: two objects that refer to each other."""
    a, b = Node(), Node()
    a.ref, b.ref = b, a
    return weakref.ref(a)


def test_frozen_startup_heap_is_skipped_but_later_garbage_is_still_collected() -> None:
    before = cycle()  # garbage at startup is collected, not frozen for ever
    try:
        freeze_startup_heap()
        assert before() is None
        assert gc.get_freeze_count() > 1000
        after = cycle()
        gc.collect()
        assert after() is None
    finally:
        gc.unfreeze()


def test_young_collections_scale_with_the_streams_and_full_ones_skip_their_survivors() -> None:
    before = gc.get_threshold()
    collector = Collector(refresh=3600)
    try:
        collector.scale(10)
        assert gc.get_threshold() == (700, *before[1:])  # never below Python's own
        collector.scale(10_000)
        assert gc.get_threshold() == (100_000, *before[1:])
        collector.install()
        gc.collect()
        assert collector.frozen_after == 1 and gc.get_freeze_count() > 1000
        later = cycle()  # garbage made after the freeze is collected as usual
        gc.collect(0)
        assert later() is None
    finally:
        collector.uninstall()
        gc.unfreeze()
        gc.set_threshold(*before)


def test_every_refresh_the_freeze_is_undone_so_old_cycles_are_collected_once() -> None:
    collector = Collector(refresh=0.0)
    try:
        collector.install()
        gc.freeze()  # as an earlier full collection left it
        gc.collect()
        assert collector.frozen_after == 0 and gc.get_freeze_count() == 0
    finally:
        collector.uninstall()
        gc.unfreeze()


async def test_the_loop_load_reads_zero_on_a_loop_it_cannot_measure() -> None:
    load = LoopLoad(asyncio.get_running_loop(), window=0.0)
    time.sleep(0.01)
    assert load() == 0.0


async def _burst_of_calls(n: int, *, batched: bool) -> tuple[bool, int]:
    """A real grpc.aio server and client in this loop; ``n`` concurrent calls. Returns whether
    gRPC's reader was wrapped, and how many times the loop found gRPC's socket readable."""
    import grpc

    loop = asyncio.get_running_loop()

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/t.T/Echo")
            await call(b"warm-up")  # gRPC's completion queue (and its reader) exist from here
            wrapped = batch_grpc_wakeups(loop) if batched else False
            sel = loop._selector  # type: ignore[attr-defined]
            fd = next(k.fd for k in sel.get_map().values()
                      if "_handle_events" in repr(k.data[0]) or "on_readable" in repr(k.data[0]))
            seen = 0
            select = sel.select

            def counting(timeout: float | None = None) -> Any:
                nonlocal seen
                events = select(timeout)
                seen += sum(1 for key, _ in events if key.fd == fd)
                return events

            sel.select = counting
            try:
                answers = await asyncio.gather(*(call(b"%d" % i) for i in range(n)))
            finally:
                del sel.select
            assert answers == [b"%d" % i for i in range(n)]
            return wrapped, seen
    finally:
        await server.stop(None)


def test_a_burst_of_grpc_completions_wakes_the_loop_a_few_times_not_once_each() -> None:
    n = 300
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        wrapped, batched = runner.run(_burst_of_calls(n, batched=True))
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        _, plain = runner.run(_burst_of_calls(n, batched=False))
    assert wrapped
    # Each call completes twice on the server and once or more on the client.
    assert plain >= n, f"without batching the socket was readable only {plain} times"
    assert batched < plain / 2, (batched, plain)


def test_without_a_grpc_server_in_the_loop_nothing_is_wrapped() -> None:
    async def scenario() -> bool:
        return batch_grpc_wakeups(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        assert runner.run(scenario()) is False


async def test_cancel_all_ends_a_task_whose_loop_lost_the_first_cancellation() -> None:
    """As Python 3.11's wait_for does when what it waits for arrives with the cancellation:
    the task goes on waiting, and only a second cancellation ends it."""
    cancels = 0

    async def loses_one() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise

    async def fails() -> None:
        raise ValueError("a task that failed before")

    tasks = [asyncio.create_task(loses_one()), asyncio.create_task(fails())]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all(tasks, patience=0.05), 5)
    assert all(t.done() for t in tasks) and cancels == 2
    assert isinstance(tasks[1].exception(), ValueError)


async def test_cancel_all_does_not_swallow_its_callers_cancellation() -> None:
    released = False

    async def stubborn() -> None:
        while not released:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    task = asyncio.create_task(stubborn())
    caller = asyncio.create_task(cancel_all([task], patience=0.05))
    await asyncio.sleep(0.2)
    caller.cancel()
    done, _ = await asyncio.wait({caller}, timeout=5)
    assert caller in done and caller.cancelled()
    released = True
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()
