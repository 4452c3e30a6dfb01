"""Calls racing what decides them, over a real grpc.aio server in-process (the chat fixture):
who may read a room changing while a call that reads it is under way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from helpers import Chat, ack_or_error, held_calls, hello_events, refused, send, until

from tsnetchat.client import Connection
from tsnetchat.pb import chat_pb2 as pb

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"


async def team(chat: Chat) -> tuple[Connection, Connection]:
    """Alice (an admin) and Bob, both members of +team."""
    admin = await chat.connect(ALICE, chat.token(ALICE, admin=True))
    bob = await chat.connect(BOB)
    await bob.whoami()  # (somebody who has used the server may be made a member)
    await admin.create_room("+team", [ALICE, BOB])
    return admin, bob


async def removed_while_reading(chat: Chat, go: asyncio.Event, reading: asyncio.Event,
                                admin: Connection, bob: Connection,
                                ask: Callable[[Connection], Awaitable[Any]]) -> Any:
    """Bob's ``ask`` of +team, under way while an admin removes him from it; what it ends in
    (an answer or a gRPC error)."""
    go.clear()
    reading.clear()
    call = asyncio.ensure_future(ask(bob))
    await asyncio.wait_for(reading.wait(), 10)
    await admin.set_room_members("+team", remove=[BOB])
    go.set()
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        return e
    finally:
        await admin.set_room_members("+team", add=[BOB])


async def test_a_member_removed_while_their_history_or_search_of_a_room_runs_is_not_answered_it(
        chat: Chat, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a revoked token or a narrowed grant was decided again at the end of a read
    (``service.READS``): a member removed from a private room while their History or Search
    of it was still reading got its messages all the same."""
    admin, bob = await team(chat)
    await bob.send_one("+team", "secret heron")
    await bob.send_one("general", "public heron")
    go, reading = held_calls(chat.server.service.store, monkeypatch, "before", "after", "search",
                                   "mentions_of")

    e = await removed_while_reading(chat, go, reading, admin, bob,
                                    lambda c: c.history("+team"))
    assert isinstance(e, grpc.aio.AioRpcError), e
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "not a member" in e.details()
    e = await removed_while_reading(chat, go, reading, admin, bob,
                                    lambda c: c.history("+team", after=0))
    assert isinstance(e, grpc.aio.AioRpcError), e
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED

    found = await removed_while_reading(chat, go, reading, admin, bob,
                                        lambda c: c.search("heron"))
    assert [(m.room, m.text) for m in found.messages] == [("general", "public heron")]
    found = await removed_while_reading(chat, go, reading, admin, bob,
                                        lambda c: c.search("heron", rooms=["+team"]))
    assert list(found.messages) == []
    # (and with nothing under way he reads it again, as a member)
    assert [m.text for m in (await bob.history("+team")).messages] == ["secret heron"]


async def test_a_member_removed_while_their_mentions_are_read_gets_none_of_the_rooms(
        chat: Chat, monkeypatch: pytest.MonkeyPatch) -> None:
    admin, bob = await team(chat)
    await admin.send_one("+team", f"@{BOB} the secret heron")
    await admin.send_one("general", f"@{BOB} the public heron")
    go, reading = held_calls(chat.server.service.store, monkeypatch, "mentions_of")
    got = await removed_while_reading(chat, go, reading, admin, bob, lambda c: c.mentions())
    assert [m.room for m in got] == ["general"]


async def test_a_history_of_a_room_a_member_is_removed_from_before_it_is_read_is_refused(
        chat: Chat) -> None:
    """(What the test above races with, unraced: the refusal said once he is out.)"""
    admin, bob = await team(chat)
    await admin.set_room_members("+team", remove=[BOB])
    e = await refused(bob.history("+team"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_member_removed_while_their_room_list_or_unread_counts_are_read_is_not_shown_it(
        chat: Chat, monkeypatch: pytest.MonkeyPatch) -> None:
    admin, bob = await team(chat)
    await admin.send_one("+team", "the secret heron")
    go, reading = held_calls(chat.server.service.store, monkeypatch, "unread")
    listed = await removed_while_reading(chat, go, reading, admin, bob, lambda c: c.list_rooms())
    assert "+team" not in [r.name for r in listed.rooms]
    counted = await removed_while_reading(chat, go, reading, admin, bob, lambda c: c.unread())
    assert "+team" not in [r.name for r in counted.rooms] and counted.total_unread == 0


async def test_a_member_removed_while_their_join_is_welcomed_is_not_told_the_rooms_topic_or_members(
        chat: Chat, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removed during the Welcome's own reads (its read position), Bob's Join was still
    welcomed with +team's topic and its members, and ended only at the replay."""
    admin, bob = await team(chat)
    await admin.set_topic("+team", "the secret heron")
    go, reading = held_calls(chat.server.service.store, monkeypatch, "read_mark")
    got: list[str] = []

    async def join_team(c: Connection) -> None:
        async for ev in c.stub.Join(hello_events("+team"), metadata=c.metadata):
            got.append(ev.WhichOneof("event"))

    e = await removed_while_reading(chat, go, reading, admin, bob, join_team)
    assert isinstance(e, grpc.aio.AioRpcError), e
    assert (e.code(), got) == (grpc.StatusCode.PERMISSION_DENIED, [])


@pytest.mark.parametrize("kind", ["join", "subscribe"])
async def test_a_member_removed_while_their_stream_waits_for_the_servers_copy_does_not_enter(
        chat: Chat, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A Join or Subscribe resuming past what this server's copy has waits for it
    (``_resumable``, cluster mode), after its access was decided: a member removed meanwhile
    entered the room (an independent review, 2026-11-25). The wait is held here by hand; the
    rest is the server's own path."""
    admin, bob = await team(chat)
    go, reading = held_calls(chat.server.service, monkeypatch, "_resumable")
    got: list[str] = []

    async def open_team(c: Connection) -> None:
        call = (c.stub.Join(hello_events("+team"), metadata=c.metadata) if kind == "join" else
                c.stub.Subscribe(pb.SubscribeRequest(room="+team"), metadata=c.metadata))
        async for ev in call:
            got.append(ev.WhichOneof("event"))

    e = await removed_while_reading(chat, go, reading, admin, bob, open_team)
    assert isinstance(e, grpc.aio.AioRpcError), e
    assert (e.code(), got) == (grpc.StatusCode.PERMISSION_DENIED, [])
    assert "+team" not in chat.server.service.hub.rooms_of(BOB)



@pytest.mark.server_config(history_kib_per_second=100)
async def test_history_pages_asked_all_at_once_keep_to_the_persons_budget(chat: Chat) -> None:
    """A person's History budget was looked at before each read and spent after it: pages
    asked all at once each found it unspent, and 100 pages of 800 KB (80 MB) were answered
    from a budget of 16 MiB (a review, 2026-11-25). Here the budget is 800 KiB at once, and
    a page 800 KB."""
    mallory = await chat.connect("mallory@tailnet.test")
    sends = [send(f"{i} " + "x" * 4000, f"m{i}") for i in range(200)]
    call = mallory.stub.Join(hello_events("general", then=sends), metadata=mallory.metadata)
    await ack_or_error(call, "m199")
    call.cancel()
    conns = [await chat.connect("mallory@tailnet.test") for _ in range(4)]

    async def page(c: Connection) -> int | grpc.StatusCode:
        try:
            return len((await c.history("general")).messages)
        except grpc.aio.AioRpcError as e:
            return e.code()

    got = await asyncio.gather(*(page(conns[i % 4]) for i in range(20)))
    answered = [g for g in got if isinstance(g, int)]
    assert set(got) - set(answered) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # (the first page spends the budget; one begun on what it left may overdraw it)
    assert 1 <= len(answered) <= 2 and set(answered) == {200}, got
    alice = await chat.connect("alice@tailnet.test")
    assert len((await alice.history("general")).messages) == 200  # (a budget of her own)


@pytest.mark.server_config(max_rooms_per_client=3)
@pytest.mark.parametrize("kind", ["join", "subscribe"])
async def test_streams_that_wait_for_the_servers_copy_all_at_once_keep_to_the_rooms_limit(
        chat: Chat, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A Join or Subscribe was held to max_rooms_per_client before it waited for this
    server's copy (``_resumable``, cluster mode), and entered its room after: streams opened
    all at once each found the limit unspent, and all entered (a review, 2026-11-25). The
    wait is held here by hand; the rest is the server's own path."""
    mallory = await chat.connect("mallory@tailnet.test")
    go, waiting = asyncio.Event(), []
    resumable = chat.server.service._resumable

    async def held(*args: Any) -> None:
        waiting.append(args)
        await go.wait()
        await resumable(*args)

    monkeypatch.setattr(chat.server.service, "_resumable", held)
    opened = [mallory.stub.Join(hello_events(f"room{i}"), metadata=mallory.metadata)
              if kind == "join" else mallory.subscribe(f"room{i}") for i in range(8)]
    firsts = [asyncio.ensure_future(first_event(c)) for c in opened]
    await until(lambda: len(waiting) == 8, "every stream waiting for the copy")
    go.set()
    got = await asyncio.gather(*firsts)
    assert sorted(got, key=str) == sorted(["welcome" if kind == "join" else "replay_done"] * 3
                                          + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5, key=str)
    assert chat.server.service.hub.subscriptions_of("mallory@tailnet.test") == 3
    for c in opened:
        c.cancel()


async def first_event(call: Any) -> str | grpc.StatusCode:
    """The kind of a stream's first event, or the status it ends with first."""
    try:
        async for ev in call:
            return str(ev.WhichOneof("event"))
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


async def test_a_replay_under_way_when_the_server_begins_to_stop_ends_there_in_its_words(
        chat: Chat, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed by the shutdown in the middle of its replay, a stream went on replaying to the
    end (or until the grace ran out, when its client was told only CANCELLED, and the server
    waited all the grace for it): what it sent was thrown away by the reconnect anyway (a
    review, 2026-11-25)."""
    alice = await chat.connect(ALICE)
    sends = [send(f"m{i}", f"m{i}") for i in range(600)]
    call = alice.stub.Join(hello_events("general", then=sends), metadata=alice.metadata)
    await ack_or_error(call, "m599")
    call.cancel()
    go, reading = held_calls(chat.server.service.store, monkeypatch, "after")
    go.clear()
    bob = await chat.connect(BOB)
    tail = bob.subscribe("general", after=0)
    await asyncio.wait_for(reading.wait(), 10)
    stopper = asyncio.create_task(chat.server.stop(grace=5))
    hub = chat.server.service.hub
    await until(lambda: [s.closed is not None for s in hub._by_login.get(BOB, ())] == [True],
                "bob's stream closed by the shutdown")
    go.set()
    messages = 0
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for ev in tail:
            messages += len(ev.batch.messages) + ev.HasField("message")
    assert (e.value.code(), messages) == (grpc.StatusCode.UNAVAILABLE, 0)
    assert "restarting" in (e.value.details() or "")
    await asyncio.wait_for(stopper, 10)


async def test_a_join_waiting_for_its_hello_when_the_server_begins_to_stop_ends_in_its_words(
        chat: Chat) -> None:
    """Not yet in the hub, a Join admitted and waiting for its hello was not closed by
    ``begin_shutdown``: the server waited the whole grace for it, and its client was told
    only CANCELLED (a review, 2026-11-25)."""
    alice = await chat.connect(ALICE)
    call = alice.stub.Join(metadata=alice.metadata)
    await until(lambda: chat.server.gate.leases() == 1, "the join waits for its hello")
    stopper = asyncio.create_task(chat.server.stop(grace=30))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (e.value.details() or "")
    await asyncio.wait_for(stopper, 10)
