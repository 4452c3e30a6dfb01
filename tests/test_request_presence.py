"""Presence over a real grpc.aio server in-process (the chat fixture): what the throttle of a
person's comings and goings holds (``ChatService._comings``)."""

from __future__ import annotations

import asyncio

from helpers import Chat, collect, hello_events, until

MALLORY = "mallory@t.t"


async def test_joins_into_new_rooms_left_before_they_are_announced_leave_nothing_held(
        chat: Chat) -> None:
    """Over the throttle, a Join's coming was held, and its going put in its place, one per
    room: one ``*`` token opening Joins into new rooms, reading to replay_done and
    cancelling left 501 held events after 576 Joins in 10 s, let out one a second (a
    review, 2026-11-25). A person never said to be in a room has nothing to say there."""
    comings = chat.server.service._comings
    comings._buckets.configure(2, 1e-6)  # (two, then none while the test runs)
    mallory = await chat.connect(MALLORY)
    for i in range(12):
        call = mallory.stub.Join(hello_events(f"churn{i}"), metadata=mallory.metadata)
        await collect(call, 1, kind="replay_done")
        call.cancel()
        await until(lambda: not chat.server.service.hub.subscriptions_of(MALLORY))
    assert len(comings) == 0
    stay = mallory.stub.Join(hello_events("general", hold=asyncio.Event()),
                             metadata=mallory.metadata)
    await collect(stay, 1, kind="replay_done")
    assert len(comings) == 1  # (her coming into general, held: still to be said)
    stay.cancel()
    await until(lambda: len(comings) == 0, "her coming, never said, is taken back")
