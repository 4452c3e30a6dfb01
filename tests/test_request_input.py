"""Requests a client got wrong, over a real grpc.aio server in-process (the chat fixture):
each is refused in words, and costs the caller nothing it did not use."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from helpers import Chat, refused

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"


@pytest.mark.server_config(searches_per_minute=2)
async def test_a_search_refused_for_what_it_asks_does_not_use_one_of_the_persons_searches(
        chat: Chat) -> None:
    """An author nobody has, or too many rooms named, was refused after the search had been
    counted against searches_per_minute: two such typos and the corrected search was told
    to wait."""
    alice = await chat.connect(ALICE)
    await alice.send_one("general", "the heron")
    e = await refused(alice.search("heron", author="nobody@tailnet.test"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "nobody with the login" in e.details()
    e = await refused(alice.search("heron", rooms=[f"r{i}" for i in range(101)]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 100 rooms" in e.details()
    assert [m.text for m in (await alice.search("heron", author=ALICE)).messages] == ["the heron"]
    assert [m.text for m in (await alice.search("heron")).messages] == ["the heron"]
    e = await refused(alice.search("heron"))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # (the limit still holds)


async def test_a_membership_change_that_adds_and_removes_one_person_is_refused_and_changes_nothing(
        chat: Chat) -> None:
    """Both at once was taken, the removal winning without a word: the admin who meant to
    add bob found him out of the room."""
    admin = await chat.connect(ALICE, chat.token(ALICE, admin=True))
    bob = await chat.connect(BOB)
    await bob.whoami()
    await admin.create_room("+team", [ALICE, BOB])
    e = await refused(admin.set_room_members("+team", add=[BOB], remove=["Bob@tailnet.test"]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == (f"{BOB!r} is both added and removed; nobody was added or removed")
    assert sorted((await admin.set_room_members("+team")).members) == [ALICE, BOB]


async def test_an_away_message_refused_as_malformed_does_not_use_one_of_the_persons_changes(
        chat: Chat) -> None:
    """Each /away was counted against the away limit before its message was looked at: ten
    malformed ones, and the corrected /away was told to slow down."""
    from helpers import collect, hello_events

    from tsnetchat.pb import chat_pb2 as pb
    from tsnetchat.service import AWAY_BURST

    alice = await chat.connect(ALICE)
    bad = [pb.ClientEvent(away=pb.Away(away=True, message="x" * 300, client_msg_id=f"a{i}"))
           for i in range(AWAY_BURST)]
    good = pb.ClientEvent(away=pb.Away(away=True, message="lunch", client_msg_id="ok"))
    call = alice.stub.Join(hello_events("general", then=[*bad, good], hold=asyncio.Event()),
                           metadata=alice.metadata)
    errors = await collect(call, AWAY_BURST, kind="error")
    assert [e.client_msg_id for e in errors] == [f"a{i}" for i in range(AWAY_BURST)]
    assert all("an away message is one line" in e.message for e in errors)
    got = []
    async for ev in call:
        which = ev.WhichOneof("event")
        if which == "error" or (which == "presence"
                                and ev.presence.kind == pb.PRESENCE_KIND_AWAY):
            got.append(ev)
            break
    assert got[0].WhichOneof("event") == "presence", got[0]
    assert got[0].presence.away_message == "lunch"
    call.cancel()


async def test_revoking_a_token_id_nobody_was_given_is_refused_and_records_nothing(
        chat: Chat) -> None:
    """It was answered as done (0 streams closed) and recorded as revoked, where `tsnetchat
    token revoke` refuses it: a mistyped id looked revoked."""
    from helpers import token_id

    from tsnetchat.pb import chat_pb2 as pb

    admin = await chat.connect(ALICE, chat.token(ALICE, admin=True))
    bobs = chat.token(BOB)
    e = await refused(admin.stub.RevokeToken(pb.RevokeTokenRequest(token_id="tok-typo"),
                                             metadata=admin.metadata))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no token with id 'tok-typo' was issued here" in (e.details() or "")
    assert (await chat.server.service.store.revocations_since(0))[0] == []
    res = await admin.stub.RevokeToken(pb.RevokeTokenRequest(token_id=token_id(bobs)),
                                       metadata=admin.metadata)
    assert res.streams_closed == 0  # (a known one is revoked, as before)
    assert (await chat.server.service.store.revocations_since(0))[0] == [token_id(bobs)]
    e = await refused((await chat.connect(BOB, bobs)).whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.server_config(searches_per_minute=2)
async def test_a_search_naming_a_room_that_is_no_room_or_not_allowed_does_not_use_a_search(
        chat: Chat) -> None:
    """A room name that is none (capitals), or a room the token does not allow, was refused
    after the search had been counted: two typos of --room and the corrected search was
    told to wait (a review, 2026-11-25)."""
    alice = await chat.connect(ALICE, chat.token(ALICE, ("general",)))
    await alice.send_one("general", "the heron")
    e = await refused(alice.search("heron", rooms=["General"]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid room name" in e.details()
    e = await refused(alice.search("heron", rooms=["general", "ops"]))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'ops'" in (e.details() or "")
    e = await refused(alice.search("heron", rooms=["dm:"]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "somebody other" in e.details()
    for _ in range(2):
        found = await alice.search("heron", rooms=["general"])
        assert [m.text for m in found.messages] == ["the heron"]
    e = await refused(alice.search("heron"))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # (the limit still holds)


async def test_marking_read_a_conversation_with_a_login_nobody_has_is_refused_as_history_is(
        chat: Chat) -> None:
    """MarkRead of a DM naming a typo was answered as done (read up to 0), where History and
    Search of it say nobody has that login (a review, 2026-11-25)."""
    alice = await chat.connect(ALICE)
    bob = await chat.connect(BOB)
    await bob.whoami()
    e = await refused(alice.mark_read("dm:bobb@tailnet.test", 5))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nobody with the login 'bobb@tailnet.test'" in (e.details() or "")
    last = await alice.send_one(f"dm:{BOB}", "lunch?")
    assert await bob.mark_read("dm:Alice@tailnet.test", last) == last  # (capitals forgiven)


async def test_a_client_msg_id_with_control_characters_is_refused_and_nothing_is_stored(
        chat: Chat) -> None:
    """"e\\x00" was taken, stored and echoed back as the message's id (a review,
    2026-11-25); an id names a message to its sender and nothing else."""
    from helpers import collect, hello_events, send

    from tsnetchat.pb import chat_pb2 as pb

    alice = await chat.connect(ALICE)
    for ev in (send("hello", "e\x00"),
               pb.ClientEvent(away=pb.Away(away=True, message="lunch",
                                           client_msg_id="a\x1b[2J\u200b"))):
        call = alice.stub.Join(hello_events("general", then=[ev]), metadata=alice.metadata)
        (e,) = await collect(call, 1, kind="error")
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], e
        assert e.message == "client_msg_id holds control or invisible characters", e
        call.cancel()
    assert (await alice.history("general")).messages == []
