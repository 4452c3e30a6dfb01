"""Read positions over an in-process server: what a person reads right after an Ack."""

from __future__ import annotations

import pytest
from helpers import Chat, Joined, collect, hello_events, until, write_lock_held

from tsnetchat import ledger
from tsnetchat.pb import chat_pb2 as pb

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"


def ack(last_seen_id: int) -> pb.ClientEvent:
    return pb.ClientEvent(ack=pb.Ack(last_seen_id=last_seen_id))


async def test_unread_counts_mentions_and_a_welcome_asked_right_after_an_ack_show_it(
        chat: Chat, monkeypatch: pytest.MonkeyPatch) -> None:
    """Positions are written in batches (ledger.MARK_DELAY, here long enough to ask in
    between); until then the counts, the unread mentions and another device's Welcome
    were those from before the Ack."""
    monkeypatch.setattr(ledger, "MARK_DELAY", 600.0)
    alice = await chat.connect(ALICE)
    bob = await chat.connect(BOB)
    await bob.whoami()  # (the server knows bob's name)
    for i in range(3):
        await alice.send_one("general", f"bob, m{i}")
    marks = chat.server.service.ledger  # (its _marks: taken, not yet written)
    laptop = Joined(bob, "general", None, [ack(1)])
    await collect(laptop.call, 1, kind="replay_done")
    await until(lambda: bool(marks._marks), "the ack taken")
    (general,) = (await bob.unread()).rooms
    assert (general.unread, general.unread_mentions, general.last_read_id) == (2, 2, 1)
    await laptop.write(ack(2))
    await until(lambda: bool(marks._marks), "the second ack taken")
    assert [m.id for m in await bob.mentions()] == [3]
    await laptop.write(ack(3))
    await until(lambda: bool(marks._marks), "the third ack taken")
    phone = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
    (welcome,) = await collect(phone, 1, kind="welcome")
    assert welcome.last_read_id == 3
    laptop.cancel()
    phone.cancel()


@pytest.mark.server_config(store_wait=0.3)
async def test_read_positions_given_while_the_database_is_locked_are_written_once_it_is_free(
        chat: Chat, caplog: pytest.LogCaptureFixture) -> None:
    """They were dropped when their write failed: bob's position went back to where it was
    before the lock, and his unread count with it, for good (his chat does not give the
    same position twice)."""
    alice = await chat.connect(ALICE)
    bob = await chat.connect(BOB)
    for i in range(3):
        await alice.send_one("general", f"m{i}")
    laptop = Joined(bob, "general", None, [])
    await collect(laptop.call, 1, kind="replay_done")
    async with write_lock_held(chat.cfg.db_path) as lock:
        await laptop.write(ack(3))
        await until(lambda: "could not store 1 read positions" in caplog.text,
                    "the positions' write fails", timeout=10)
        await lock.release()
    (general,) = (await bob.unread()).rooms
    assert (general.unread, general.last_read_id) == (0, 3)
    laptop.cancel()
