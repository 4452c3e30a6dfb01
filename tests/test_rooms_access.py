"""Who may read a private room or a direct conversation, over a real in-process server
(the seam is the RPC; identities from FakeTailnet): its members, and nobody else, whatever
their token says, admins included unless ``admins_read_dms``. A non-member is told
``rooms.NOT_VISIBLE``, and lists, searches and mentions leave the conversation out."""

from __future__ import annotations

import grpc
import pytest
from helpers import Chat, collect, first_of, refused

from tsnetchat import rooms

ALICE, BOB, CAROL = "alice@tailnet.test", "bob@tailnet.test", "carol@tailnet.test"
ADMIN = "root@tailnet.test"
ALICE_AND_BOB = f"dm:{ALICE},{BOB}"
CAP = "example.com/cap/tsnetchat"


async def test_a_private_room_is_read_by_its_members_only_an_admin_and_a_star_token_included(
        chat: Chat) -> None:
    admin = await chat.connect(ADMIN, chat.token(ADMIN, admin=True))
    alice, bob = await chat.connect(ALICE), await chat.connect(BOB)  # both hold "*"
    await admin.create_room("+ops", [ALICE])
    assert await alice.send_one("+ops", "launch codes") == 1
    assert [m.text for m in (await alice.history("+ops")).messages] == ["launch codes"]
    for outsider in (admin, bob):
        e = await refused(outsider.history("+ops"))
        assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, rooms.NOT_VISIBLE)
        assert "+ops" not in [r.name for r in (await outsider.list_rooms()).rooms]
        assert "+ops" not in [r.name for r in (await outsider.unread()).rooms]
        assert not (await outsider.search("launch")).messages


async def test_an_admin_reads_other_peoples_direct_messages_only_with_admins_read_dms(
        chat: Chat) -> None:
    admin = await chat.connect(ADMIN, chat.token(ADMIN, admin=True))
    alice, bob = await chat.connect(ALICE), await chat.connect(BOB)
    await bob.whoami()  # (bob is known to the server: a conversation with him may begin)
    assert await alice.send_one(f"dm:{BOB}", "between us") == 1
    assert [m.text for m in (await bob.history(f"dm:{ALICE}")).messages] == ["between us"]
    # Named in full, it means a conversation of the three of them, which has nothing.
    assert not (await admin.history(ALICE_AND_BOB)).messages
    assert ALICE_AND_BOB not in [r.name for r in (await admin.list_rooms()).rooms]
    assert not (await admin.search("between")).messages
    await chat.restart(admins_read_dms=True)
    admin = await chat.connect(ADMIN, chat.token(ADMIN, admin=True))
    assert [m.text for m in (await admin.history(ALICE_AND_BOB)).messages] == ["between us"]


@pytest.mark.server_config(admins_read_dms=True)
async def test_an_admin_reading_others_conversation_is_cut_off_once_the_grant_takes_admin_away(
        chat: Chat) -> None:
    """(The gate decides the stream again on the tailnet's change, ``Lease.hold_conversation``:
    what let it in must still hold.)"""
    alice, bob = await chat.connect(ALICE), await chat.connect(BOB)
    await bob.whoami()
    assert await alice.send_one(f"dm:{BOB}", "between us") == 1
    admin = await chat.connect(ADMIN, chat.token(ADMIN, admin=True),
                               cap_map={CAP: [{"rooms": ["*"], "admin": True}]})
    sub = admin.subscribe(ALICE_AND_BOB)
    assert [m.text for m in await collect(sub, 1)] == ["between us"]
    chat.net.update(ADMIN, cap_map={CAP: [{"rooms": ["*"], "admin": False}]})
    chat.net.announce_everything()
    e = await refused(first_of(sub, "message", timeout=10))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "you may no longer read this conversation" in (e.details() or "")


async def test_mentions_are_answered_only_from_rooms_the_token_still_allows(chat: Chat) -> None:
    """bob was mentioned in a room his token does not name: his Mentions leave it out
    (the rooms are applied in the store's query, before its limit)."""
    bob = await chat.connect(BOB, chat.token(BOB, ("general",)))
    assert await bob.send_one("general", "hello") == 1  # (known: he can be mentioned)
    alice = await chat.connect(ALICE)
    assert await alice.send_one("random", "bob: see this") == 1
    assert await alice.send_one("general", "bob: and this") == 2
    assert [(m.room, m.text) for m in await bob.mentions()] == [("general", "bob: and this")]


async def test_a_person_mentioned_in_a_private_room_they_are_not_in_is_not_told(
        chat: Chat) -> None:
    admin = await chat.connect(ADMIN, chat.token(ADMIN, admin=True))
    alice, bob = await chat.connect(ALICE), await chat.connect(BOB)
    assert await bob.send_one("general", "hello") == 1  # (known: he can be mentioned)
    await admin.create_room("+ops", [ALICE])
    assert await alice.send_one("+ops", "bob must not know") == 1
    assert await bob.mentions(include_read=True) == []
    await admin.set_room_members("+ops", add=[BOB])
    assert await bob.mentions(include_read=True) == []  # (it never mentioned him)
    assert [m.mentions for m in (await bob.history("+ops")).messages] == [[]]


@pytest.mark.server_config(max_dm_members=3)
@pytest.mark.parametrize("members", [3, 4])
async def test_a_direct_conversation_holds_at_most_max_dm_members_people(
        chat: Chat, members: int) -> None:
    people = [ALICE, BOB, CAROL, ADMIN][:members]
    conns = [await chat.connect(x) for x in people]
    for c in conns:
        await c.whoami()
    room = "dm:" + ",".join(people[1:])
    if members <= 3:
        assert await conns[0].send_one(room, "hi all") == 1
    else:
        e = await refused(conns[0].send_one(room, "hi all"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.details() == ("a direct conversation has at most 3 people (max_dm_members); "
                               "this one has 4")
        assert not chat.server.store.rooms()
