"""Fan-out pacing: when a room's subscribers are woken."""

from __future__ import annotations

import asyncio

import pytest

from tsnetchat.hub import Hub, Item, Pacing, Subscriber

# --- fan-out pacing -------------------------------------------------------------------------
# A long linger and a wide busy window, so what these assert is order, not speed.
SLOW = Pacing(frame_cost=1.0, linger_max=0.05, busy_window=60.0, wake_at=4)


def _item(i: int) -> Item:
    return Item(i, b"m%d" % i, b"")


async def _pending_after_yields(task: asyncio.Task[None]) -> bool:
    for _ in range(5):
        await asyncio.sleep(0)
    return not task.done()


async def test_a_quiet_room_wakes_its_subscribers_at_once() -> None:
    hub = Hub(SLOW)
    sub = Subscriber("r", "a", "t", limit=100)
    hub.add(sub)
    waiting = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    hub.publish("r", _item(1))
    assert not await _pending_after_yields(waiting)
    assert sub.drain(10) == [_item(1)]


async def _busy_room(n: int = 1, hub: Hub | None = None) -> tuple[Hub, list[Subscriber]]:
    """A room whose first message went out at once; the next ones find it busy."""
    hub = hub or Hub(SLOW)
    subs = [Subscriber("r", f"u{i}", "t", limit=100) for i in range(n)]
    for s in subs:
        hub.add(s)
    hub.publish("r", _item(1))
    for s in subs:
        await s.wait()
        s.drain(10)
    return hub, subs


async def test_a_busy_room_holds_messages_so_they_share_one_frame() -> None:
    hub, subs = await _busy_room(3)
    waiting = [asyncio.create_task(s.wait()) for s in subs]
    hub.publish("r", _item(2))  # busy now: held for the room's linger
    hub.publish("r", _item(3))
    assert all([await _pending_after_yields(t) for t in waiting])
    await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert [s.drain(10) for s in subs] == [[_item(2), _item(3)]] * 3


async def test_a_linger_shorter_than_the_loops_timer_resolution_is_no_linger() -> None:
    hub, [sub] = await _busy_room(hub=Hub(Pacing(frame_cost=1e-4, busy_window=60.0)))
    waiting = asyncio.create_task(sub.wait())
    hub.publish("r", _item(2))  # busy, but 100 us of linger would really be 1 ms or more
    assert not await _pending_after_yields(waiting)


async def test_a_long_queue_is_drained_without_waiting_for_the_linger() -> None:
    hub, [sub] = await _busy_room()
    waiting = asyncio.create_task(sub.wait())
    for i in range(2, SLOW.wake_at + 2):
        hub.publish("r", _item(i))
    assert not await _pending_after_yields(waiting)


async def test_what_one_drain_leaves_behind_is_drained_next_without_waiting() -> None:
    hub = Hub(SLOW)
    sub = Subscriber("r", "a", "t", limit=100)
    hub.add(sub)
    for i in range(3):
        sub.push(_item(i))
    await sub.wait()
    assert sub.drain(2) == [_item(0), _item(1)]
    assert not await _pending_after_yields(asyncio.create_task(sub.wait()))
    assert sub.drain(2) == [_item(2)]


async def test_an_ack_in_a_busy_room_rides_with_the_held_echo_of_its_message() -> None:
    hub, [sub] = await _busy_room()
    waiting = asyncio.create_task(sub.wait())
    hub.publish("r", _item(2))  # held for the room's linger
    hub.reply(sub, Item(0, b"ack"))  # held too: one frame for the echo and its ack
    assert await _pending_after_yields(waiting)
    await asyncio.wait_for(waiting, 10)
    assert [i.id for i in sub.drain(10)] == [2, 0]


async def test_an_ack_in_a_quiet_room_goes_at_once() -> None:
    hub = Hub(SLOW)
    sub = Subscriber("r", "a", "t", limit=100)
    hub.add(sub)
    waiting = asyncio.create_task(sub.wait())
    hub.reply(sub, Item(0, b"ack"))
    assert not await _pending_after_yields(waiting)


def test_the_linger_stretches_only_when_the_event_loop_is_saturated() -> None:
    p = Pacing(frame_cost=25e-6, linger_max=0.005, min_linger=0.001, loaded_from=0.5,
               overload_from=0.85, overload_full=0.97, overload_linger=0.02)
    assert p.linger(10) == p.linger(10, load=0.5) == pytest.approx(250e-6)  # i.e. none
    assert p.linger(10, load=0.6) == p.linger(10, load=0.85) == 0.001  # loaded: a real batch
    assert p.linger(1000, load=0.5) == 0.005  # capped
    assert p.linger(10, load=0.97) == p.linger(10, load=1.0) == pytest.approx(0.02)
    halfway = p.linger(10, load=0.91)
    assert halfway == pytest.approx((0.001 + 0.02) / 2)


async def test_a_saturated_loop_makes_a_busy_room_linger_longer() -> None:
    load = [0.0]
    pacing = Pacing(frame_cost=1e-4, linger_max=0.005, busy_window=60.0, overload_linger=0.3)
    hub, [sub] = await _busy_room(hub=Hub(pacing, load=lambda: load[0]))

    async def held_for(i: int) -> float:
        t = asyncio.get_running_loop().time()
        hub.publish("r", _item(i))
        await asyncio.wait_for(sub.wait(), 10)
        sub.drain(10)
        return asyncio.get_running_loop().time() - t

    assert await held_for(2) < 0.1  # the normal linger: 100 us for one subscriber
    load[0] = 1.0
    assert await held_for(3) >= 0.25  # saturated: the overload linger
