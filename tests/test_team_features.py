"""A team's day (issue 15), over the real tailnet lab: alice, bob and mallory are real
tailnet logins on real tailscaled nodes; the server decides who they are with WhoIs.

Direct messages, private rooms, read positions and unread counts, mentions, search, edits
and deletions (with the text gone from the database file), topics, away.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import LabChat, collect, extra_node, first_of, hello_events, refused, until

from tsnetchat.client import Connection, dm_room
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.rooms import NOT_VISIBLE

pytestmark = [pytest.mark.tailnet, pytest.mark.security]

ALICE, BOB, MALLORY = "alice@tailnet.test", "bob@tailnet.test", "mallory@tailnet.test"


async def away_event(watch: Any) -> pb.Presence:
    """The next AWAY on a stream (within 10 s)."""
    async def loop() -> pb.Presence:
        async for ev in watch:
            if ev.WhichOneof("event") == "presence" and \
                    ev.presence.kind == pb.PRESENCE_KIND_AWAY:
                return ev.presence
        raise AssertionError("stream ended")

    return await asyncio.wait_for(loop(), 10)


async def people(lab_chat: LabChat, *, mallory_admin: bool = True
                 ) -> tuple[Connection, Connection, Connection]:
    """alice, bob, and mallory with a token for every room (and admin rights by default:
    neither may open a conversation she is not part of)."""
    return (await lab_chat.connect("alice-laptop", lab_chat.token(ALICE)),
            await lab_chat.connect("bob-laptop", lab_chat.token(BOB)),
            await lab_chat.connect("mallory-laptop",
                                   lab_chat.token(MALLORY, admin=mallory_admin)))


async def test_mallory_cannot_read_search_list_or_infer_a_direct_conversation_of_alice_and_bob(
        lab_chat: LabChat) -> None:
    alice, bob, mallory = await people(lab_chat)
    dm = await alice.send_one(dm_room(BOB), "the launch code is zebra42quartz")
    assert dm == 1
    room = "dm:" + ",".join(sorted([ALICE, BOB]))
    # bob reads it under either name (the server adds the caller)
    for name in (dm_room(ALICE), room):
        page = await bob.history(name)
        assert [m.text for m in page.messages] == ["the launch code is zebra42quartz"]
    assert room in [r.name for r in (await bob.list_rooms()).rooms]

    listed = (await mallory.list_rooms()).rooms
    assert all(not r.name.startswith("dm:") for r in listed)
    assert all(not r.name.startswith("dm:") for r in (await mallory.unread()).rooms)
    assert not (await mallory.search("zebra42quartz")).messages
    assert not (await mallory.search("zebra42quartz", rooms=[room])).messages
    assert not await mallory.mentions(include_read=True)
    # Whatever she names, her own login is part of it: "alice and bob" from mallory is a
    # conversation of the three of them, empty, exactly as for people who never talked.
    real = await mallory.history(room)
    ghost = await mallory.history(dm_room(ALICE))  # (alice and mallory: never talked)
    assert not real.messages and not ghost.messages
    # A login nobody has is refused, as a Search naming it is, whoever else is named.
    typo = await refused(mallory.history("dm:" + ",".join(sorted([ALICE, "carol@tailnet.test"]))))
    assert typo.code() == grpc.StatusCode.INVALID_ARGUMENT and "check the spelling" in (
        typo.details() or "")
    sub = mallory.subscribe(room)
    welcome = await first_of(sub, "replay_done")
    assert welcome.last_id == 0
    sub.cancel()


async def test_admins_read_direct_conversations_only_when_admins_read_dms_is_set(
        lab_chat: LabChat) -> None:
    alice, _bob, mallory = await people(lab_chat)
    await alice.send_one(dm_room(BOB), "private words")
    room = "dm:" + ",".join(sorted([ALICE, BOB]))
    assert not (await mallory.history(room)).messages
    assert not (await mallory.search("private")).messages
    lab_chat.server.service.apply(
        lab_chat.server.service.limits.__class__(
            **{**lab_chat.server.service.limits.__dict__, "admins_read_dms": True}))
    assert [m.text for m in (await mallory.history(room)).messages] == ["private words"]
    assert [m.text for m in (await mallory.search("private")).messages] == ["private words"]


async def test_a_private_room_is_seen_and_joined_only_by_its_members(
        lab_chat: LabChat, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tsnetchat.service")
    alice, bob, mallory = await people(lab_chat, mallory_admin=False)
    admin = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE, admin=True))
    made = await admin.create_room("+ops", [ALICE, BOB])
    assert list(made.members) == [ALICE, BOB]
    await bob.send_one("+ops", "deploy at noon, password swordfish77")
    assert "+ops" in [r.name for r in (await alice.list_rooms()).rooms]
    assert "+ops" not in [r.name for r in (await mallory.list_rooms()).rooms]
    assert not (await mallory.search("swordfish77")).messages
    real = await refused(mallory.history("+ops"))
    ghost = await refused(mallory.history("+nothing-here"))
    assert real.details() == ghost.details() == NOT_VISIBLE
    e = await refused(mallory.send_one("+ops", "let me in"))
    assert e.details() == NOT_VISIBLE
    # Removing bob closes his stream and takes the room from his list.
    call = bob.stub.Join(hello_events("+ops"), metadata=bob.metadata)
    assert (await first_of(call, "welcome")).private
    res = await admin.set_room_members("+ops", remove=[BOB])
    assert res.streams_closed == 1 and list(res.members) == [ALICE]
    assert f"private room '+ops': '{ALICE}' added [], removed ['{BOB}']" in caplog.text
    assert (await refused(first_of(call, "going_away"))).code() == \
        grpc.StatusCode.PERMISSION_DENIED
    assert "+ops" not in [r.name for r in (await bob.list_rooms()).rooms]
    assert (await refused(bob.history("+ops"))).details() == NOT_VISIBLE
    # only admins manage members
    e = await refused(alice.create_room("+mine", [ALICE]))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    # a kick is for token rooms: in a private room it says how to remove someone
    e = await refused(admin.stub.Kick(pb.KickRequest(room="+ops", login=ALICE),
                                      metadata=admin.metadata))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "room-members SERVER +room --remove LOGIN" in (e.details() or "")


async def test_a_second_device_of_alice_sees_the_unread_counts_the_first_one_left(
        lab_chat: LabChat) -> None:
    alice, bob, _ = await people(lab_chat)
    await alice.whoami()  # alice is online: the server knows her name
    for text in ("morning all", "Alice, can you look at the build?", "thanks"):
        await bob.send_one("general", text)
    info = {r.name: r for r in (await alice.list_rooms()).rooms}["general"]
    assert (info.unread, info.unread_mentions) == (3, 1)
    mentions = await alice.mentions()
    assert [m.text for m in mentions] == ["Alice, can you look at the build?"]
    # Device one reads up to the mention with an Ack on its Join stream.
    ack = pb.ClientEvent(ack=pb.Ack(last_seen_id=2))
    call = alice.stub.Join(hello_events("general", then=[ack]), metadata=alice.metadata)
    await first_of(call, "replay_done")
    # Device two: another node of alice's on the tailnet, with its own connection.
    extra_node(lab_chat.lab, "alice-desktop", "alice")
    phone = await lab_chat.connect("alice-desktop", lab_chat.token(ALICE))
    counts: dict[str, pb.RoomInfo] = {}

    async def refresh() -> None:
        counts.update({r.name: r for r in (await phone.unread()).rooms})

    for _ in range(100):
        await refresh()
        if counts["general"].last_read_id == 2:
            break
        await asyncio.sleep(0.05)
    g = counts["general"]
    assert (g.last_read_id, g.unread, g.unread_mentions) == (2, 1, 0)
    assert not await phone.mentions()
    call.cancel()
    # MarkRead never moves back.
    assert await phone.mark_read("general", 1) == 2
    assert await phone.mark_read("general", 3) == 3
    assert (await phone.unread()).total_unread == 0


async def test_a_deleted_message_is_gone_from_history_search_and_the_database_file(
        lab_chat: LabChat) -> None:
    alice, bob, mallory = await people(lab_chat)
    secret = await alice.send_one("general", "oops my token is hunter2xyzzy")
    await alice.send_one("general", "ignore that")
    edited = await alice.edit("general", secret, "oops my token is hunter2xyzzy (edited)")
    assert edited > secret
    # Others cannot delete it; the author can.
    assert (await refused(bob.delete("general", secret))).code() == \
        grpc.StatusCode.PERMISSION_DENIED
    assert (await bob.search("hunter2xyzzy")).messages
    await alice.delete("general", secret)
    page = await bob.history("general")
    original = next(m for m in page.messages if m.id == secret)
    assert (original.text, original.deleted_by) == ("", ALICE)
    assert all("hunter2xyzzy" not in m.text for m in page.messages)
    assert not (await bob.search("hunter2xyzzy")).messages
    assert not (await mallory.search("hunter2xyzzy")).messages
    db = Path(lab_chat.cfg.db_path)
    wal = db.with_name(db.name + "-wal")
    # The purge runs in a pause of writing, at the latest store.PURGE_WITHIN seconds later.
    await until(lambda: b"hunter2xyzzy" not in db.read_bytes() and (
        not wal.exists() or b"hunter2xyzzy" not in wal.read_bytes()),
        "the text leaves the database file and its WAL", timeout=60)
    con = sqlite3.connect(db)
    try:
        n = con.execute("SELECT COUNT(*) FROM messages WHERE text LIKE '%hunter2xyzzy%'").fetchone()
        assert n == (0,)
    finally:
        con.close()


async def test_an_admin_may_delete_any_message_and_the_tombstone_names_the_admin(
        lab_chat: LabChat) -> None:
    alice, bob, _ = await people(lab_chat)
    admin = await lab_chat.connect("mallory-laptop", lab_chat.token(MALLORY, admin=True))
    mid = await bob.send_one("general", "something rude")
    await admin.delete("general", mid)
    m = next(m for m in (await alice.history("general")).messages if m.id == mid)
    assert (m.text, m.deleted_by) == ("", MALLORY)


async def test_edits_and_deletions_converge_on_a_client_that_was_offline(
        lab_chat: LabChat) -> None:
    alice, bob, _ = await people(lab_chat)
    first = await alice.send_one("general", "version one")
    gone = await alice.send_one("general", "a secret")
    page = await bob.history("general")
    last_seen = page.messages[-1].id  # bob goes offline here
    await alice.edit("general", first, "version two")
    await alice.delete("general", gone)
    call = bob.stub.Join(hello_events("general", after=last_seen), metadata=bob.metadata)
    events = await collect(call, 2)
    call.cancel()
    assert [(e.kind, e.target_id, e.text) for e in events] == [
        (pb.MESSAGE_KIND_EDIT, first, "version two"), (pb.MESSAGE_KIND_DELETE, gone, "")]
    assert events[1].deleted_by == ALICE


async def test_edits_are_refused_after_the_edit_window_with_a_clear_error(
        lab_chat: LabChat) -> None:
    alice, _, _ = await people(lab_chat)
    mid = await alice.send_one("general", "quick one")
    svc = lab_chat.server.service
    svc.apply(svc.limits.__class__(**{**svc.limits.__dict__, "edit_window_seconds": 0.001}))
    await asyncio.sleep(0.05)
    e = await refused(alice.edit("general", mid, "too late"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "edit_window_seconds" in e.details()
    assert "is older than 0 seconds, the server's edit window" in e.details()  # (not "0s")


async def test_edits_beyond_edits_per_minute_are_refused_with_a_retry_time(
        lab_chat: LabChat) -> None:
    alice, _, _ = await people(lab_chat)
    svc = lab_chat.server.service
    svc.apply(svc.limits.__class__(**{**svc.limits.__dict__, "edits_per_minute": 2}))
    mid = await alice.send_one("general", "draft")
    await alice.edit("general", mid, "draft 2")
    await alice.edit("general", mid, "draft 3")
    e = await refused(alice.edit("general", mid, "draft 4"))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "edits_per_minute" in e.details()


async def test_a_topic_is_shown_on_join_with_who_set_it_and_changes_are_events(
        lab_chat: LabChat) -> None:
    alice, bob, _ = await people(lab_chat)
    watch = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
    w = await first_of(watch, "welcome")
    assert not w.HasField("topic")
    await alice.set_topic("general", "Release week: freeze on Friday")
    (ev,) = await collect(watch, 1)
    assert (ev.kind, ev.text, ev.sender.login) == (
        pb.MESSAGE_KIND_TOPIC, "Release week: freeze on Friday", ALICE)
    watch.cancel()
    again = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
    w = await first_of(again, "welcome")
    again.cancel()
    assert (w.topic.text, w.topic.set_by.login) == ("Release week: freeze on Friday", ALICE)
    assert w.topic.set_unix_ms > 0
    await bob.send_one("random", "a room without a topic")
    listed = {r.name: r for r in (await bob.list_rooms()).rooms}  # every topic in one read
    assert (listed["general"].topic.text, listed["general"].topic.id) == (
        "Release week: freeze on Friday", w.topic.id)
    assert not listed["random"].HasField("topic")
    e = await refused(alice.set_topic("general", "x" * 300))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_topic_bytes" in e.details()


async def test_a_topic_or_away_message_of_only_invisible_characters_is_none(
        lab_chat: LabChat) -> None:
    """They were stored and shown as "set the topic: " and nothing, which the README says
    no text made only of invisible characters is (an attacker's run, 2026-11-24)."""
    alice, bob, _ = await people(lab_chat)
    await alice.set_topic("random", "a topic to hide")
    watch = bob.stub.Join(hello_events("random"), metadata=bob.metadata)
    assert (await first_of(watch, "welcome")).topic.text == "a topic to hide"
    await first_of(watch, "replay_done")
    await alice.set_topic("random", "\u200b\u2060 \ufeff")
    (ev,) = await collect(watch, 1)
    assert (ev.kind, ev.text) == (pb.MESSAGE_KIND_TOPIC, "")
    away = pb.ClientEvent(away=pb.Away(away=True, message="\u200b\u200b"))
    call = alice.stub.Join(hello_events("random", then=[away]), metadata=alice.metadata)
    p = await away_event(watch)
    assert (p.who.login, p.away_message) == (ALICE, "")
    for c in (call, watch):
        c.cancel()


async def test_search_pages_filters_by_author_and_orders_newest_first(lab_chat: LabChat) -> None:
    alice, bob, _ = await people(lab_chat)
    for i in range(5):
        await alice.send_one("general", f"deploy number {i}")
    await bob.send_one("general", "deploy from bob")
    res = await bob.search("deploy", newest=True, limit=2)
    assert [m.text for m in res.messages] == ["deploy from bob", "deploy number 4"]
    assert res.more and res.next_offset == 2
    res = await bob.search("deploy", newest=True, limit=2, offset=2)
    assert [m.text for m in res.messages] == ["deploy number 3", "deploy number 2"]
    res = await bob.search("deploy", author=BOB)
    assert [m.text for m in res.messages] == ["deploy from bob"]
    assert (await bob.search("depl*", author=BOB)).messages
    e = await refused(bob.search("x" * 300))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "search_max_query_bytes" in e.details()
    e = await refused(bob.search("!!!"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_away_with_a_message_is_announced_to_the_rooms_of_the_person(
        lab_chat: LabChat) -> None:
    alice, bob, _ = await people(lab_chat)
    watch = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
    await first_of(watch, "replay_done")
    away = pb.ClientEvent(away=pb.Away(away=True, message="lunch"))
    call = alice.stub.Join(hello_events("general", then=[away]), metadata=alice.metadata)
    await first_of(call, "replay_done")
    p = await away_event(watch)
    assert (p.who.login, p.away_message) == (ALICE, "lunch")
    assert ALICE in p.away_logins
    # A second stream of hers (another device, a restarted client) gets no JOINED of its
    # own: its Welcome says who is away.
    second = alice.stub.Join(hello_events("general"), metadata=alice.metadata)
    assert list((await first_of(second, "welcome")).away_logins) == [ALICE]
    bobs = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
    assert list((await first_of(bobs, "welcome")).away_logins) == [ALICE]
    for c in (second, bobs, call, watch):
        c.cancel()


async def test_a_refused_away_names_the_id_it_was_sent_with(lab_chat: LabChat) -> None:
    alice, _, _ = await people(lab_chat)
    long = pb.ClientEvent(away=pb.Away(away=True, message="x" * 300, client_msg_id="aw-1"))
    call = alice.stub.Join(hello_events("general", then=[long]), metadata=alice.metadata)
    e = await first_of(call, "error")
    assert (e.client_msg_id, e.code) == ("aw-1", grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "an away message is one line" in e.message
    call.cancel()
    silly = pb.ClientEvent(away=pb.Away(away=True, message="lunch", client_msg_id="x" * 65))
    call = alice.stub.Join(hello_events("general", then=[silly]), metadata=alice.metadata)
    e = await first_of(call, "error")
    assert (e.client_msg_id, e.message) == ("", "client_msg_id longer than 64 characters")
    call.cancel()


async def test_an_edit_changes_whom_its_message_mentions(lab_chat: LabChat) -> None:
    """"hey alice" edited to "hey team" still counted as a mention of alice, in `mentions`
    and the unread counts (a new user's day, 2026-11-24)."""
    alice, bob, _ = await people(lab_chat)
    await bob.whoami()  # the server knows bob's name

    async def bobs() -> tuple[list[int], int, tuple[str, ...]]:
        counts = {r.name: r.unread_mentions for r in (await bob.unread()).rooms}
        said = {m.id: tuple(m.mentions) for m in (await bob.history("general")).messages}
        return ([m.id for m in await bob.mentions()], counts.get("general", 0),
                said.get(mid, ()))

    mid = await alice.send_one("general", "hey bob, meeting at 3")
    assert await bobs() == ([mid], 1, (BOB,))
    await alice.edit("general", mid, "hey team, meeting at 3")
    assert await bobs() == ([], 0, ())
    await alice.edit("general", mid, "hey team and bob, meeting at 3")
    assert await bobs() == ([mid], 1, (BOB,))


async def test_history_replay_search_and_mentions_carry_the_mentions_stored_with_a_message(
        lab_chat: LabChat) -> None:
    alice, bob, _ = await people(lab_chat)
    await alice.whoami()  # the server knows alice's name
    before = await bob.send_one("general", "nothing for anyone")
    mid = await bob.send_one("general", "alice: the quokka7 build is green")
    history = {m.id: tuple(m.mentions) for m in (await alice.history("general")).messages}
    assert history[mid] == (ALICE,)
    assert history[before] == ()
    call = alice.stub.Join(hello_events("general", after=before), metadata=alice.metadata)
    (replayed,) = await collect(call, 1)
    call.cancel()
    assert (replayed.id, tuple(replayed.mentions)) == (mid, (ALICE,))
    for newest in (False, True):
        (found,) = (await alice.search("quokka7", newest=newest)).messages
        assert tuple(found.mentions) == (ALICE,)
    (mentioned,) = await alice.mentions()
    assert tuple(mentioned.mentions) == (ALICE,)
