"""The Mentions call over an in-process server: which mentions a person is shown."""

from __future__ import annotations

import pytest
from helpers import Chat

BOB = "bob@tailnet.test"


@pytest.mark.server_config(max_page=3)
async def test_mentions_in_rooms_the_caller_may_not_read_do_not_hide_those_in_rooms_they_may(
        chat: Chat) -> None:
    """Anyone in a room may name bob, also where bob's token does not let him read. Those
    took the page's places before they were left out: three in #general hid the one in
    #alerts, and bob was shown no mention at all."""
    bob = await chat.connect(BOB, chat.token(BOB, ("alerts",)))
    await bob.whoami()  # (the server knows bob's name)
    carol = await chat.connect("carol@tailnet.test")
    await carol.send_one("alerts", "bob: the disk is full")
    for i in range(3):
        await carol.send_one("general", f"has anyone seen bob? ({i})")
    assert [m.text for m in await bob.mentions(include_read=True)] == [
        "bob: the disk is full"]
    assert [m.text for m in await bob.mentions()] == ["bob: the disk is full"]


@pytest.mark.server_config(max_message_bytes=60_000)
async def test_mentions_in_big_messages_come_newest_first_as_many_as_a_client_can_read(
        chat: Chat) -> None:
    """80 mentions of 59 KB made an answer of 4.7 MB, which this client (every stock gRPC
    client) refused: "Received message larger than max" (a review, 2026-11-25). The newest
    come, as many as fit in a page of History (service.HISTORY_PAGE_BYTES)."""
    from helpers import collect, hello_events, send

    from tsnetchat.service import HISTORY_PAGE_BYTES

    bob = await chat.connect(BOB)
    await bob.whoami()
    carol = await chat.connect("carol@tailnet.test")
    sends = [send(f"bob: {i} " + "x" * 59_000, f"m{i}") for i in range(80)]
    call = carol.stub.Join(hello_events("general", then=sends), metadata=carol.metadata)
    await collect(call, 80, kind="sent")
    call.cancel()
    got = await bob.mentions()
    assert 0 < sum(m.ByteSize() for m in got) <= HISTORY_PAGE_BYTES
    assert [m.id for m in got] == list(range(80, 80 - len(got), -1))
