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
