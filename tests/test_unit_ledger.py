"""The ledger, driven directly: no gRPC, a real SQLite history and a real hub."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tsnetchat.errors import (
    InvalidInput,
    LimitExceeded,
    StoreDamaged,
    StoreError,
    TsnetchatError,
    Unconfirmed,
)
from tsnetchat.hub import Hub, Subscriber
from tsnetchat.ledger import Ledger
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.store import Sender, SqliteHistory, StoredMessage

ALICE = Sender("alice@example.com", "Alice", "alice-laptop")


@dataclass
class Rules:
    max_message_bytes: int = 100
    rate_burst: int = 1000
    rate_per_second: float = 1000.0
    edit_window_seconds: float = 900.0
    edits_per_minute: int = 30
    max_topic_bytes: int = 256


@dataclass
class World:
    history: SqliteHistory
    hub: Hub
    ledger: Ledger
    rules: Rules
    refused: list[tuple[Subscriber, TsnetchatError, str, float]] = field(default_factory=list)

    def member(self, login: str = "alice@example.com") -> Subscriber:
        sub = Subscriber("general", login, "t", limit=1000)
        self.hub.add(sub)
        return sub


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    history = await SqliteHistory.open(tmp_path / "db", wait=0.3)
    hub = Hub()
    rules = Rules()
    refused: list[tuple[Subscriber, TsnetchatError, str, float]] = []
    ledger = Ledger(history, hub, limits=lambda: rules,
                    refuse=lambda *a: refused.append(a))
    yield World(history, hub, ledger, rules, refused)
    await history.close()


def events(sub: Subscriber) -> list[tuple[str, Any]]:
    """What a subscriber is sent now: (kind, (id, text) or (client_msg_id, id))."""
    out: list[tuple[str, Any]] = []
    while True:
        frames, _ = sub.take()
        if not frames:
            return out
        for f in frames:
            ev = pb.ServerEvent.FromString(f)
            which = ev.WhichOneof("event")
            msgs = [ev.message] if which == "message" else list(ev.batch.messages)
            acks = [ev.sent] if which == "sent" else list(ev.batch.sent)
            out.extend(("message", (m.id, m.text)) for m in msgs)
            out.extend(("sent", (a.client_msg_id, a.id)) for a in acks)
            if which not in ("message", "sent", "batch"):
                out.append((str(which), None))


async def test_a_message_is_stored_then_shown_to_the_room_then_acknowledged(
        world: World, tmp_path: Path) -> None:
    alice, bob = world.member(), world.member("bob@example.com")
    world.ledger.send(alice, ALICE, "hello", pb.MESSAGE_KIND_TEXT, "c1")
    assert events(bob) == [] and events(alice) == []  # nothing before it is durable
    await world.ledger.drain()
    disk = sqlite3.connect(tmp_path / "db")
    assert disk.execute("SELECT text FROM messages").fetchall() == [("hello",)]
    disk.close()
    assert events(bob) == [("message", (1, "hello"))]
    assert events(alice) == [("message", (1, "hello")), ("sent", ("c1", 1))]
    assert world.refused == [] and world.history.last_id("general") == 1


async def test_a_resend_is_acknowledged_with_the_original_id_and_shown_once(
        world: World) -> None:
    alice, bob = world.member(), world.member("bob@example.com")
    world.ledger.send(alice, ALICE, "once", 0, "k")
    world.ledger.send(alice, ALICE, "once", 0, "k")
    await world.ledger.drain()
    assert events(bob) == [("message", (1, "once"))]
    assert [e for e in events(alice) if e[0] == "sent"] == [("sent", ("k", 1))] * 2


@pytest.mark.parametrize("text,kind,cmid,why", [
    ("", 1, "", "empty"), ("   ", 1, "", "empty"), ("x" * 101, 1, "", "101 bytes"),
    ("a\x1b[2Jb", 1, "", "control character"), ("\u202eevil", 1, "", "control character"),
    ("a\u2028<alice> fake line", 1, "", "U\\+2028"), ("a\ufff9hidden\ufffbb", 1, "", "U\\+FFF9"),
    ("hi", 9, "", "unknown message kind"), ("hi", 1, "k" * 65, "client_msg_id longer")])
async def test_malformed_input_is_raised_at_once_and_nothing_is_stored(
        world: World, text: str, kind: int, cmid: str, why: str) -> None:
    alice = world.member()
    with pytest.raises(InvalidInput, match=why):
        world.ledger.send(alice, ALICE, text, kind, cmid)
    assert world.history.pending() == 0 and world.refused == []


async def test_over_the_rate_a_send_is_refused_with_the_wait_and_is_not_a_strike(
        world: World) -> None:
    world.rules.rate_burst, world.rules.rate_per_second = 2, 4.0
    world.ledger.apply(world.rules)
    alice = world.member()
    for i in range(3):
        world.ledger.send(alice, ALICE, f"m{i}", 0, f"c{i}")  # raises nothing
    await world.ledger.drain()
    ((sub, error, cmid, retry_after),) = world.refused
    assert sub is alice and cmid == "c2" and isinstance(error, LimitExceeded)
    assert "slow down: at most 4 messages/s (bursts of 2)" in str(error)
    assert 0 < retry_after <= 0.25
    assert world.history.last_id("general") == 2


async def test_a_message_applied_from_the_cluster_is_shown_and_charged_or_counted_by_whose(
        world: World) -> None:
    """Cluster mode hands the ledger what no send here settles (ClusterHistory.on_applied):
    another server's message uses up its sender's rate here; one of ours that was applied
    after its sender was refused counts as stored here (it was not counted, 2026-11-25)."""
    world.rules.rate_burst, world.rules.rate_per_second = 1, 0.01
    world.ledger.apply(world.rules)
    bob = world.member("bob@example.com")
    elsewhere = StoredMessage("general", 7, 0, ALICE, pb.MESSAGE_KIND_TEXT, "via two", "x")
    world.ledger.applied(elsewhere, False)
    assert events(bob) == [("message", (7, "via two"))]
    assert world.ledger.metrics.counters["messages_total"] == 0
    alice = world.member()
    world.ledger.send(alice, ALICE, "over her rate", 0, "c1")
    ((_, error, cmid, _),) = world.refused
    assert cmid == "c1" and isinstance(error, LimitExceeded)
    late = StoredMessage("general", 8, 0, ALICE, pb.MESSAGE_KIND_TEXT, "late", "c0")
    world.ledger.applied(late, True)
    assert events(bob) == [("message", (8, "late"))]
    assert world.ledger.metrics.counters["messages_total"] == 1


async def test_a_person_brings_new_rooms_into_being_50_at_once_then_one_a_minute(
        world: World) -> None:
    from tsnetchat.ledger import NEW_ROOMS_BURST

    def member_of(room: str, login: str = "alice@example.com") -> Subscriber:
        sub = Subscriber(room, login, "t", limit=1000)
        world.hub.add(sub)
        return sub

    burst = member_of("r0")  # three lines into a new room before the first is stored: one
    for i in range(3):       # room, one token (each took one: an independent review)
        world.ledger.send(burst, ALICE, f"line {i}", 0, f"b{i}")
    for i in range(1, NEW_ROOMS_BURST + 1):
        world.ledger.send(member_of(f"r{i}"), ALICE, "first", 0, f"c{i}")
    await world.ledger.drain()
    ((_, error, cmid, retry_after),) = world.refused
    assert cmid == f"c{NEW_ROOMS_BURST}" and isinstance(error, LimitExceeded)
    assert "at most 50 new rooms and conversations at once, then one a minute" in str(error)
    assert 0 < retry_after <= 60
    assert world.history.last_id(f"r{NEW_ROOMS_BURST}") == 0  # (not made)
    # rooms that exist take any number of messages, and other people make their own
    for i in range(3):
        world.ledger.send(member_of("r0"), ALICE, "more", 0, f"d{i}")
    world.ledger.send(member_of("bobs", "bob@example.com"),
                      Sender("bob@example.com", "Bob", "bob-laptop"), "mine", 0, "b")
    await world.ledger.drain()
    assert len(world.refused) == 1
    assert world.history.last_id("r0") == 6 and world.history.last_id("bobs") == 1


async def test_a_reloaded_rate_applies_to_the_next_send(world: World) -> None:
    world.rules.rate_burst, world.rules.rate_per_second = 1, 0.01
    world.ledger.apply(world.rules)
    alice = world.member()
    world.ledger.send(alice, ALICE, "a", 0, "a")
    world.ledger.send(alice, ALICE, "b", 0, "b")
    assert [r[2] for r in world.refused] == ["b"]
    world.rules.rate_burst, world.rules.rate_per_second = 1, 1e6
    world.ledger.apply(world.rules)  # a reload: also for alice's bucket, already there
    world.ledger.send(alice, ALICE, "c", 0, "c")
    await world.ledger.drain()
    assert [r[2] for r in world.refused] == ["b"] and world.history.last_id("general") == 2


async def test_a_storage_failure_is_refused_as_not_stored_and_shown_to_nobody(
        world: World) -> None:
    alice, bob = world.member(), world.member("bob@example.com")
    real = world.history._store._db

    class FullDisk:
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "COMMIT" or sql.startswith("INSERT INTO messages"):
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

    world.history._store._db = FullDisk()  # type: ignore[assignment]
    world.ledger.send(alice, ALICE, "lost", 0, "c1")
    await world.ledger.drain()
    world.history._store._db = real
    ((_, error, cmid, retry_after),) = world.refused
    assert isinstance(error, StoreError) and cmid == "c1" and retry_after > 0
    assert "database or disk is full; this message was not stored: send it again" in str(error)
    assert events(bob) == [] and events(alice) == []


async def test_a_damaged_database_refuses_a_send_without_asking_for_it_again_and_logs_an_error(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """"send it again" cannot help a damaged database, and a warning said too little (an
    operator's run, 2026-11-24)."""
    alice = world.member()
    real = world.history._store._db

    class Damaged:
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql.startswith("INSERT INTO messages"):
                e = sqlite3.DatabaseError("database disk image is malformed")
                e.sqlite_errorcode = sqlite3.SQLITE_CORRUPT  # type: ignore[attr-defined]
                raise e
            return real.execute(sql, *args)

    world.history._store._db = Damaged()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="tsnetchat.ledger"):
        world.ledger.send(alice, ALICE, "lost", 0, "c1")
        await world.ledger.drain()
    world.history._store._db = real
    ((_, error, cmid, retry_after),) = world.refused
    assert isinstance(error, StoreDamaged) and (cmid, retry_after) == ("c1", 0.0)
    assert "is damaged (database disk image is malformed): the server's operator must stop " \
        "it and restore the last backup" in str(error)
    assert "send it again" not in str(error)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert events(alice) == []


async def test_once_stopped_sends_are_refused_as_not_stored_and_earlier_ones_finish(
        world: World) -> None:
    alice = world.member()
    world.ledger.send(alice, ALICE, "taken", 0, "c1")
    world.ledger.stop_accepting()
    world.ledger.send(alice, ALICE, "too late", 0, "c2")
    await world.ledger.drain()
    assert events(alice) == [("message", (1, "taken")), ("sent", ("c1", 1))]
    ((_, error, cmid, _),) = world.refused
    assert cmid == "c2" and isinstance(error, StoreError)
    assert "shutting down; this message was not stored" in str(error)


async def test_when_too_many_messages_wait_for_storage_new_ones_are_refused(
        world: World) -> None:
    world.ledger.max_pending = 3
    alice = world.member()
    for i in range(5):
        world.ledger.send(alice, ALICE, f"m{i}", 0, f"c{i}")
    await world.ledger.drain()
    assert [r[2] for r in world.refused] == ["c3", "c4"]
    assert "messages waiting to be stored" in str(world.refused[0][1])
    assert world.history.last_id("general") == 3


async def test_edits_deletions_and_topics_together_are_limited_to_edits_per_minute(
        world: World) -> None:
    """Each takes a token of its own bucket as it is sent (the message rate, far above,
    would let them all through)."""
    world.rules.edits_per_minute = 3
    world.ledger.apply(world.rules)
    alice = world.member()
    world.ledger.send(alice, ALICE, "first", 0, "m")
    await world.ledger.drain()
    changes = [("edited", pb.MESSAGE_KIND_EDIT, 1), ("a topic", pb.MESSAGE_KIND_TOPIC, 0),
               ("", pb.MESSAGE_KIND_DELETE, 1), ("again", pb.MESSAGE_KIND_TOPIC, 0)]
    sent = [world.ledger.send(alice, ALICE, text, kind, f"c{i}", target=target)
            for i, (text, kind, target) in enumerate(changes)]
    await world.ledger.drain()
    assert sent == [True, True, True, False]
    ((_, error, cmid, retry_after),) = world.refused
    assert cmid == "c3" and isinstance(error, LimitExceeded) and retry_after > 0
    assert "at most 3 edits, deletions and topic changes a minute" in str(error)
    assert world.history.last_id("general") == 4


async def test_a_send_refused_as_busy_or_by_the_edit_or_new_room_limit_uses_no_message_token(
        world: World) -> None:
    """Each took a token of the person's message rate first: refused for something else,
    the next line was told to slow down (an independent review, 2026-11-25)."""
    world.rules.rate_burst, world.rules.rate_per_second = 1, 0.001
    world.rules.edits_per_minute = 1
    world.ledger.apply(world.rules)
    alice = world.member()
    world.ledger.max_pending = 0
    assert not world.ledger.send(alice, ALICE, "busy", 0, "busy")
    world.ledger.max_pending = 1000
    for _ in range(world.ledger._new_room_buckets.burst):  # (the new-rooms limit spent)
        world.ledger._new_room_buckets.take(ALICE.login)
    assert not world.ledger.send(alice, ALICE, "a new room's first line", 0, "new")
    world.ledger._coming_rooms.add("general")  # (as if it were on its way)
    world.ledger._change_buckets.take(ALICE.login)  # (the edits limit spent)
    assert not world.ledger.send(alice, ALICE, "a topic", pb.MESSAGE_KIND_TOPIC, "topic")
    assert [(r[2], type(r[1]).__name__) for r in world.refused] == [
        ("busy", "StoreError"), ("new", "LimitExceeded"), ("topic", "LimitExceeded")]
    assert world.ledger.send(alice, ALICE, "still within the rate", 0, "line")
    await world.ledger.drain()
    assert len(world.refused) == 3 and world.history.last_id("general") == 1


async def test_sends_the_cluster_did_not_confirm_are_refused_and_said_in_the_log(
        world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Refused for 20 s while NATS had no quorum, with nothing in the journal (an operator's
    run)."""
    def unconfirmed(draft: Any, then: Any) -> None:
        asyncio.get_running_loop().call_soon(then, Unconfirmed("not confirmed within 12s"))

    monkeypatch.setattr(world.history, "submit", unconfirmed)
    alice = world.member()
    with caplog.at_level(logging.WARNING, logger="tsnetchat.ledger"):
        world.ledger.send(alice, ALICE, "hi", 0, "c1")
        await asyncio.sleep(0.05)
    ((_, error, cmid, _),) = world.refused
    assert cmid == "c1" and isinstance(error, Unconfirmed)
    assert "refusing messages: they were not confirmed in time (" in caplog.text


async def test_a_caller_that_stops_waiting_for_a_flush_loses_nobodys_read_positions(
        world: World) -> None:
    """MarkRead flushes everyone's gathered read positions; its caller hanging up before
    the writer thread took the batch dropped the whole batch, other people's too."""
    for who in ("alice@example.com", "bob@example.com"):
        world.ledger.send(world.member(who), Sender(who, who, "laptop"), "hi", 0, who)
    await world.ledger.drain()
    writer_free = threading.Event()
    busy = asyncio.ensure_future(world.history.job(lambda s: writer_free.wait(5)))
    world.ledger.mark_read("bob@example.com", "general", 2)
    flush = asyncio.ensure_future(world.ledger.flush_marks())  # alice's MarkRead ...
    await asyncio.sleep(0.05)
    flush.cancel()  # ... and alice hangs up while the writer is busy
    with pytest.raises(asyncio.CancelledError):
        await flush
    writer_free.set()
    await busy
    await world.ledger.drain()
    assert await world.history.read_mark("bob@example.com", "general") == 2


async def test_a_rate_refusal_due_in_milliseconds_never_says_retry_in_0s(world: World) -> None:
    """A wait of a few ms said "retry in 0.0s" (seen on the call limit in a full run), and a
    client that reads the words (``clienterrors.retry_hint``) tried again at once."""
    from tsnetchat.clienterrors import retry_hint

    # (25 a second: due within 40 ms, which was said "retry in 0.0s"; a rate of 1,000 a
    # second made the test depend on two sends within a millisecond)
    world.rules.rate_burst, world.rules.rate_per_second = 1, 25.0
    world.ledger.apply(world.rules)
    alice = world.member()
    world.ledger.send(alice, ALICE, "first", 0, "c0")
    world.ledger.send(alice, ALICE, "at once", 0, "c1")
    await world.ledger.drain()
    ((_, error, _, retry_after),) = world.refused
    assert 0 < retry_after <= 0.04
    assert "retry in 0.1s" in str(error) and retry_hint(str(error)) == 0.1


async def test_a_new_room_refused_moments_before_its_token_comes_says_a_wait_a_client_can_read(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new-rooms refusal said its wait in whole seconds: due in 0.3 s it said "retry in
    0s", read by clients as no wait at all, as the others did before they were rounded up."""
    import time as real_time
    import types

    from tsnetchat import throttle
    from tsnetchat.clienterrors import retry_hint
    from tsnetchat.ledger import NEW_ROOMS_BURST, NEW_ROOMS_RATE

    # (a clock that moves only when told: with the real one under it, 50 sends and their
    # commit taking over 0.3 s on a slow machine left the token due already)
    base, later = real_time.monotonic(), [0.0]
    monkeypatch.setattr(throttle, "time", types.SimpleNamespace(
        monotonic=lambda: base + later[0]))
    for i in range(NEW_ROOMS_BURST):
        sub = Subscriber(f"r{i}", "alice@example.com", "t", limit=1000)
        world.hub.add(sub)
        world.ledger.send(sub, ALICE, "first", 0, f"c{i}")
    await world.ledger.drain()
    later[0] = 1 / NEW_ROOMS_RATE - 0.25  # (the next token is 0.25 s away)
    sub = Subscriber("one-more", "alice@example.com", "t", limit=1000)
    world.hub.add(sub)
    world.ledger.send(sub, ALICE, "first", 0, "late")
    await world.ledger.drain()
    ((_, error, _, retry_after),) = world.refused
    assert 0 < retry_after <= 0.25 + 1e-9
    assert retry_hint(str(error)) >= retry_after, str(error)


class Walked(dict[tuple[str, str], int]):
    """Read positions waiting to be written, counting the times they are walked."""

    walks = 0

    def __iter__(self) -> Iterator[tuple[str, str]]:
        self.walks += 1
        return super().__iter__()


async def test_waiting_for_ones_own_read_positions_does_not_walk_everybody_elses(
        world: World) -> None:
    """Each Join, ListRooms, Unread and Mentions waits for the caller's positions
    (``written_for``): it walked every position waiting to be written, everybody's."""
    world.ledger.send(world.member(), ALICE, "hi", 0, "c1")
    await world.ledger.drain()
    for i in range(1000):
        world.ledger.mark_read(f"p{i}@example.com", "general", 1)
    world.ledger._marks = marks = Walked(world.ledger._marks)
    await world.ledger.written_for("bob@example.com")  # nothing of bob's waits
    assert marks.walks == 0
    assert len(world.ledger._marks) == 1000  # (still waiting for the batch)
    await world.ledger.written_for("p7@example.com")
    assert await world.history.read_mark("p7@example.com", "general") == 1
    assert await world.history.read_mark("p8@example.com", "general") == 1  # (one batch)


async def test_a_message_answered_unconfirmed_is_shown_and_acknowledged_once_stored_after_all(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung disk's write (SqliteHistory._overdue): its sender is told it may still
    appear, and the history settles it again when the write returns. Stored, it was shown
    to nobody: the room's readers went on past its id."""
    alice, bob = world.member(), world.member("bob@example.com")
    submit = world.history.submit

    def unsure_first(draft: Any, then: Any) -> None:
        then(Unconfirmed("the disk is stalled; it may still appear"))
        if draft.text == "lost":  # (its write failed: the sender was told to send again)
            then(StoreError("disk I/O error"))
        else:
            submit(draft, then)

    monkeypatch.setattr(world.history, "submit", unsure_first)
    world.ledger.send(alice, ALICE, "held", 0, "k")
    assert [(r[2], str(r[1])) for r in world.refused] == [
        ("k", "the disk is stalled; it may still appear")]
    assert alice.inflight == 0 and events(bob) == []
    await world.ledger.drain()
    assert events(bob) == [("message", (1, "held"))]
    assert events(alice) == [("message", (1, "held")), ("sent", ("k", 1))]
    world.ledger.send(alice, ALICE, "lost", 0, "l")
    await world.ledger.drain()
    assert [r[2] for r in world.refused] == ["k", "l"] and alice.inflight == 0
    assert events(bob) == [] and events(alice) == []


async def test_a_resend_answered_unconfirmed_that_was_stored_already_is_not_shown_again(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hung write returns a duplicate (the first send was stored): the room saw that
    one, and the sender is answered when it sends again, as it was told to."""
    alice, bob = world.member(), world.member("bob@example.com")
    world.ledger.send(alice, ALICE, "once", 0, "k")
    await world.ledger.drain()
    assert events(bob) == [("message", (1, "once"))]
    events(alice)
    submit = world.history.submit

    def unsure_first(draft: Any, then: Any) -> None:
        then(Unconfirmed("the disk is stalled; it may still appear"))
        submit(draft, then)

    monkeypatch.setattr(world.history, "submit", unsure_first)
    world.ledger.send(alice, ALICE, "once", 0, "k")
    await world.ledger.drain()
    assert [r[2] for r in world.refused] == ["k"]
    assert events(bob) == [] and events(alice) == []
    monkeypatch.undo()
    world.ledger.send(alice, ALICE, "once", 0, "k")
    await world.ledger.drain()
    assert events(bob) == [] and events(alice) == [("sent", ("k", 1))]
    assert world.history.last_id("general") == 1


async def test_a_read_position_past_the_rooms_newest_message_is_the_newest(
        world: World) -> None:
    """Kept as given, it counted the messages still to come as read: unread counts and
    mentions missed them."""
    alice = world.member()
    world.ledger.send(alice, ALICE, "one", 0, "c1")
    await world.ledger.drain()
    assert world.ledger.mark_read("bob@example.com", "general", 10**6) == 1
    await world.ledger.flush_marks()
    assert await world.history.read_mark("bob@example.com", "general") == 1
    world.ledger.send(alice, ALICE, "two", 0, "c2")
    await world.ledger.drain()
    (state,) = await world.history.unread("bob@example.com", ["general"])
    assert (state.last_read, state.unread) == (1, 1)


async def test_read_positions_whose_write_failed_do_not_undo_one_given_meanwhile(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch that failed is kept to be written again, under any position given while
    it was being written: a reader's position went back to the failed batch's."""
    alice = world.member()
    for i in range(7):
        world.ledger.send(alice, ALICE, f"m{i}", 0, f"c{i}")
    await world.ledger.drain()
    write = world.history.mark_read

    async def full_disk_once(marks: Any) -> None:
        monkeypatch.setattr(world.history, "mark_read", write)
        world.ledger.mark_read("bob@example.com", "general", 7)  # (read on meanwhile)
        raise StoreError("database or disk is full")

    monkeypatch.setattr(world.history, "mark_read", full_disk_once)
    world.ledger.mark_read("bob@example.com", "general", 5)
    await world.ledger.flush_marks()
    await world.ledger.flush_marks()
    assert await world.history.read_mark("bob@example.com", "general") == 7


async def test_an_edit_of_an_id_past_sqlites_largest_integer_is_bad_input_and_reaches_no_disk(
        world: World) -> None:
    """A uint64 target_id above 2**63 - 1 raised OverflowError on the writer thread."""
    alice = world.member()
    for kind in (pb.MESSAGE_KIND_EDIT, pb.MESSAGE_KIND_DELETE):
        with pytest.raises(InvalidInput, match="is not a message id"):
            world.ledger.send(alice, ALICE, "x", kind, "c", target=2**63)
    assert world.history.pending() == 0
    assert world.ledger.send(alice, ALICE, "x", pb.MESSAGE_KIND_EDIT, "c", target=2**63 - 1)
    await world.ledger.drain()
    ((_, error, cmid, _),) = world.refused
    assert (cmid, str(error)) == ("c", f"there is no message {2**63 - 1} in 'general' to edit")


@pytest.mark.parametrize("topic", ["release\n<alice> fake line", "\nrelease", "release\n"])
async def test_a_topic_of_more_than_one_line_is_bad_input_and_nothing_is_stored(
        world: World, topic: str) -> None:
    """A topic is shown on one line (the status bar, ListRooms): a second line there
    passes for something else."""
    alice = world.member()
    with pytest.raises(InvalidInput, match="a topic is one line of printable text"):
        world.ledger.send(alice, ALICE, topic, pb.MESSAGE_KIND_TOPIC, "t")
    assert world.history.pending() == 0 and world.refused == []


@pytest.mark.parametrize("kind", [pb.MESSAGE_KIND_TEXT, pb.MESSAGE_KIND_ACTION])
async def test_a_message_naming_a_target_is_bad_input_and_nothing_is_stored(
        world: World, kind: int) -> None:
    """Only an edit or a deletion changes another message; a message stored with a
    target would read as one."""
    alice = world.member()
    with pytest.raises(InvalidInput, match="target_id is only for edits and deletions"):
        world.ledger.send(alice, ALICE, "hello", kind, "c", target=1)
    assert world.history.pending() == 0 and world.refused == []
