"""Storage rules against real SQLite in a temp dir."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import until, write_lock_held

from tsnetchat import store as store_module
from tsnetchat.errors import InvalidInput, StoreError
from tsnetchat.store import (
    RANK_WINDOW,
    SCHEMA_VERSION,
    Draft,
    Outcome,
    Sender,
    SqliteHistory,
    Store,
    Written,
)

A = Sender("a@example.com", "A", "a-laptop.example.ts.net")

# --- the synchronous store ------------------------------------------------------------------


def test_retention_keeps_ids_increasing_and_never_reused(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    for i in range(10):
        s.append("r", A, 1, f"m{i}", now_ms=1000 * i)
    assert s.prune(keep_count=3, keep_days=0) == 7
    assert [m.id for m in s.after("r", 0, 100)] == [8, 9, 10]
    s.close()
    s = Store(tmp_path / "db")
    assert s.append("r", A, 1, "next")[0].id == 11
    assert s.prune(keep_count=0, keep_days=1, now=10**6) == 3  # m7..m9 are old by then
    s.close()


def test_a_room_whose_every_message_retention_deleted_goes_on_from_its_last_id_reopened(
        tmp_path: Path) -> None:
    """The room's high-water mark is written with the deletion. Without it, a reopened store
    counts from the mark its first message left and gives ids 2, 3... again, which resuming
    readers have shown already (a mutant that skipped it passed every in-process test,
    2026-11-25)."""
    s = Store(tmp_path / "db")
    for i in range(5):
        s.append("r", A, 1, f"m{i}", now_ms=1000 * i)
    assert s.prune(keep_count=0, keep_days=1, now=10**6) == 5
    s.close()
    s = Store(tmp_path / "db")
    assert s.last_id("r") == 5
    assert s.append("r", A, 1, "next")[0].id == 6
    s.close()


def test_retention_in_steps_deletes_the_same_as_at_once(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    for i in range(50):
        s.append(f"r{i % 3}", A, 1, f"m{i}")
    steps = []
    while (n := s.prune(keep_count=4, keep_days=0, max_rows=7)) == 7:
        steps.append(n)
    steps.append(n)
    assert sum(steps) == 50 - 3 * 4 and len(steps) > 1
    assert {r: [m.id for m in s.after(r, 0, 100)] for r in ("r0", "r1", "r2")} == {
        "r0": [14, 15, 16, 17], "r1": [14, 15, 16, 17], "r2": [13, 14, 15, 16]}
    s.close()


def test_checkpoints_run_on_their_own_thread_and_keep_the_wal_to_one_round(
        tmp_path: Path) -> None:
    """Each round waits for the checkpointer (``settled``) before the next: it asserted
    ``runs >= 1`` after 4,000 appends back to back, and failed while CI loaded the machine
    (the thread had not run yet; it fails alike with each round made to begin 1 s late)."""
    s = Store(tmp_path / "db")
    rounds = 40
    one_round = 0
    for i in range(rounds * Store.CHECKPOINT_EVERY):
        s.append("r", A, 1, f"m{i}", f"k{i}")
        if i == Store.CHECKPOINT_EVERY - 2:
            one_round = (tmp_path / "db-wal").stat().st_size  # before any checkpoint
        if (i + 1) % Store.CHECKPOINT_EVERY == 0:
            assert s.checkpointer is not None and s.checkpointer.settled(60)
    assert s.checkpointer is not None and s.checkpointer.runs >= rounds
    assert s.checkpointer.ident != threading.get_ident()
    # Each caught up, so the next commit began the WAL again. Without them SQLite's own
    # checkpoint (at 1,000 pages: 16 MB) would let it grow to three rounds and more.
    assert (tmp_path / "db-wal").stat().st_size < 2 * one_round
    s.close()
    assert [m.id for m in Store(tmp_path / "db").after("r", 3995, 10)] == [3996, 3997, 3998,
                                                                             3999, 4000]


def test_a_write_refused_for_a_full_disk_has_the_wal_checkpointed_and_cut_to_nothing(
        tmp_path: Path) -> None:
    """Nothing asked for a checkpoint while every write failed: the WAL kept the space a
    database could have grown into (a reliability run, 2026-11-25). SQLITE_FULL here from
    the writer's max_page_count, which the checkpoint's own connection does not have."""
    s = Store(tmp_path / "db")
    for i in range(5):
        s.append("r", A, 1, f"m{i}")
    assert (tmp_path / "db-wal").stat().st_size > 0
    pages = s._db.execute("PRAGMA page_count").fetchone()[0]
    s._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(StoreError, match="full"):
        for _ in range(100):
            s.append("r", A, 1, "x" * 3000)
    checkpointer = s.checkpointer
    assert checkpointer is not None
    assert checkpointer.settled(60)
    assert checkpointer.truncated >= 1
    assert (tmp_path / "db-wal").stat().st_size == 0  # all of it in the database
    s.close()
    assert [m.text for m in Store(tmp_path / "db").after("r", 0, 10)][:5] == [
        f"m{i}" for i in range(5)]


def test_a_group_is_one_transaction_and_a_resend_inside_it_gets_the_original_id(
        tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    drafts = [Draft("r", A, 1, f"m{i}", f"k{i}") for i in range(3)]
    drafts.append(Draft("r", A, 1, "m1", "k1"))  # a resend in the same group
    drafts.append(Draft("r", Sender("b@example.com", "B", "b"), 1, "m1", "k1"))  # not B's
    got = [(w.message.id, w.duplicate) for w in s.write(drafts)]
    assert got == [(1, False), (2, False), (3, False), (2, True), (4, False)]
    s.close()


class FullDisk:
    """A connection on a full disk: writing a message, or committing, fails."""

    def __init__(self, real: sqlite3.Connection, *, insert_fails: bool = True) -> None:
        self.real, self.insert_fails = real, insert_fails

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" or (self.insert_fails and sql.startswith("INSERT INTO messages")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)


def test_a_failed_group_commit_loses_the_whole_group_and_says_so(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    s.append("r", A, 1, "kept")
    real = s._db
    s._db = FullDisk(real, insert_fails=False)  # type: ignore[assignment]  # only COMMIT
    with pytest.raises(StoreError, match="database or disk is full"):
        s.write([Draft("r", A, 1, f"lost{i}") for i in range(2)] + [Draft("new", A, 1, "x")])
    s._db = real
    assert s.last_ids() == {"r": 1}  # the lost ids were never seen by anyone
    assert [m.text for m in s.after("r", 0, 10)] == ["kept"]
    assert s.append("r", A, 1, "after")[0].id == 2
    assert s.append("new", A, 1, "first")[0].id == 1
    s.close()


def test_indexing_for_search_on_a_full_disk_is_logged_a_few_times_not_after_every_commit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Store(tmp_path / "db")
    s.append("r", A, 1, "waiting to be indexed")
    real = s._db
    s._db = FullDisk(real, insert_fails=False)  # type: ignore[assignment]  # only COMMIT
    for _ in range(50):
        assert s.index_pending() == 0 and s.unindexed
    s._db = real
    said = [r for r in caplog.records if "could not index" in r.getMessage()]
    assert 1 <= len(said) <= 3, len(said)  # (it was 50: one a commit, 85 a minute)
    assert s.index_pending() == 1  # and it is indexed once the disk has room
    s.close()


# --- schema versions -------------------------------------------------------------------------

# The schema round 1 shipped (tsnetchat/store.py at dd7c15f), verbatim.
ROUND_1_SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    login TEXT NOT NULL,
    display_name TEXT NOT NULL,
    node TEXT NOT NULL,
    kind INTEGER NOT NULL,
    text TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
DROP INDEX IF EXISTS messages_dedup;
CREATE INDEX IF NOT EXISTS messages_by_sender_key ON messages (room, login, client_msg_id);
CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts_ms);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY,
    sub TEXT NOT NULL,
    rooms TEXT NOT NULL,
    admin INTEGER NOT NULL,
    iat INTEGER NOT NULL,
    exp INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    jti TEXT NOT NULL UNIQUE,
    at INTEGER NOT NULL
);
"""


def round_1_database(path: Path) -> None:
    """A database as round 1 left it: two rooms, one of them pruned past its newest message,
    two devices of one person, a token and a revocation."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(ROUND_1_SCHEMA)
    rows = []
    for i in range(1, 6):
        node = "a-laptop" if i % 2 else "a-phone"
        rows.append(("general", i, 1000 + i, "a@example.com", "A", node, 1, f"g{i}", f"k{i}"))
    rows.append(("ops", 7, 2000, "b@example.com", "B", "b", 2, "waves", ""))
    db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)", rows)
    db.executemany("INSERT INTO rooms VALUES (?,?)", [("general", 1), ("ops", 9)])
    db.execute("INSERT INTO tokens VALUES ('t1', 'a@example.com', '*', 0, 1, 2)")
    db.execute("INSERT INTO revocations (jti, at) VALUES ('t1', 3)")
    db.close()


def test_round_1_database_is_upgraded_in_place_keeping_everything(tmp_path: Path) -> None:
    path = tmp_path / "tsnetchat.db"
    round_1_database(path)
    s = Store(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA page_size").fetchone()[0] == 16384  # rewritten by the upgrade
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    general = s.after("general", 0, 10)
    assert [(m.id, m.ts_ms, m.text, m.client_msg_id, m.sender.node) for m in general] == [
        (i, 1000 + i, f"g{i}", f"k{i}", "a-laptop" if i % 2 else "a-phone") for i in range(1, 6)]
    (ops,) = s.after("ops", 0, 10)
    assert (ops.id, ops.kind, ops.sender) == (7, 2, Sender("b@example.com", "B", "b"))
    # ops was pruned past its newest message: its high-water mark (9) still holds.
    assert s.last_ids() == {"general": 5, "ops": 9}
    assert s.append("ops", A, 1, "next")[0].id == 10
    # A resend of a message stored before the upgrade is still recognised, from any device.
    msg, dup = s.append("general", Sender("a@example.com", "A", "a-tablet"), 1, "g3", "k3")
    assert dup and msg.id == 3
    assert [(t.jti, t.revoked_at) for t in s.list_tokens()] == [("t1", 3)]
    assert s.revocations_since(0) == (["t1"], 1)
    s.close()
    s = Store(path)  # opening again changes nothing
    assert s.last_ids() == {"general": 5, "ops": 10}
    s.close()


def test_a_database_from_a_newer_tsnetchat_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this tsnetchat understands"):
        Store(tmp_path / "db")


@pytest.mark.parametrize("sizes", [
    pytest.param("random", id="900-4000-random"),
    *(pytest.param(n, id=f"{n}-bytes") for n in (900, 2100, 3300, 4096))])
def test_disk_use_stays_within_one_and_a_half_times_the_text_plus_a_fixed_overhead(
        tmp_path: Path, sizes: int | str) -> None:
    """Round 1 used 4,783 bytes for an average 2,455-byte text (an overflow page per row)."""
    rng = random.Random(1)
    n = 600
    lengths = [rng.randint(900, 4000) if sizes == "random" else int(sizes) for _ in range(n)]
    s = Store(tmp_path / "db")
    for i in range(0, n, 20):  # three rooms, interleaved, in groups as a busy server writes
        s.write([Draft(f"room{j % 3}", A, 1, "x" * lengths[j], uuid.uuid4().hex)
                 for j in range(i, i + 20)])
    s.close()
    db = sqlite3.connect(tmp_path / "db")
    # The messages and their indexes; the search index (schema version 2) is on top of this
    # and depends on the words, not the layout ("x" * 4000 is one 4000-byte word).
    used = db.execute("SELECT SUM(pgsize) FROM dbstat WHERE name LIKE 'messages%' AND "
                      "name NOT LIKE 'messages_fts%'").fetchone()[0]
    db.close()
    assert used <= 1.5 * sum(lengths) + 200 * n


# --- the server's history, off the event loop -----------------------------------------------


async def test_a_write_asked_of_a_closed_history_is_refused_not_left_waiting(
        tmp_path: Path) -> None:
    h = await SqliteHistory.open(tmp_path / "db")
    await h.close()
    with pytest.raises(StoreError, match="closed"):
        await asyncio.wait_for(h.mark_read([("alice", "r", 1)]), 5)


async def test_a_job_queued_while_the_writer_indexes_is_run_when_the_history_closes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job queued before the history began closing, while the writer was indexing (or
    purging) after its last round, was left in the queue when the writer saw the close:
    its caller waited for ever."""
    monkeypatch.setattr(store_module, "INDEX_WITHIN", 0.0)  # (indexing after every round)
    h = await SqliteHistory.open(tmp_path / "db")
    indexing, go_on = threading.Event(), threading.Event()
    index = h._store.index_pending

    def slow_index() -> int:
        indexing.set()
        go_on.wait(5)
        return index()

    monkeypatch.setattr(h._store, "index_pending", slow_index)
    await h.job(lambda s: None)  # (a round, then the writer indexes)
    assert await asyncio.to_thread(indexing.wait, 5)
    late = asyncio.ensure_future(h.job(lambda s: "done"))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(h.close())
    await asyncio.sleep(0.1)
    go_on.set()
    await asyncio.wait_for(closing, 5)
    assert await asyncio.wait_for(late, 5) == "done"


async def test_submitted_messages_settle_on_the_loop_in_order_after_their_commit(
        tmp_path: Path) -> None:
    h = await SqliteHistory.open(tmp_path / "db")
    disk = sqlite3.connect(tmp_path / "db")  # another reader: what a crash would leave
    settled: list[tuple[int, bool, int]] = []

    def then(outcome: Outcome) -> None:
        assert isinstance(outcome, Written)
        on_disk = disk.execute("SELECT COUNT(*) FROM messages WHERE id=?",
                               (outcome.message.id,)).fetchone()[0]
        settled.append((outcome.message.id, outcome.duplicate, on_disk))

    for i in range(20):
        h.submit(Draft("r", A, 1, f"m{i}", f"k{i}"), then)
    h.submit(Draft("r", A, 1, "m4", "k4"), then)
    assert h.pending() == 21
    await h.drain()
    assert settled == [(i, False, 1) for i in range(1, 21)] + [(5, True, 1)]
    assert h.pending() == 0 and h.last_id("r") == 20 and h.rooms() == {"r": 20}
    assert [m.id for m in await h.after("r", 17, 10)] == [18, 19, 20]
    assert [m.id for m in await h.before("r", 3, 10)] == [1, 2]
    assert [m.id for m in await h.latest("r", 2)] == [19, 20]
    disk.close()
    await h.close()


async def test_a_message_the_store_cannot_take_is_refused_and_the_writer_goes_on(
        tmp_path: Path) -> None:
    """An error that is not the database's (an id beyond SQLite's integers reached it once:
    the writer thread died and nothing was stored after it) refuses the message, with the
    others of its commit group (refusals say "send it again"); those before and after it are
    stored."""
    h = await SqliteHistory.open(tmp_path / "db")
    outcomes: list[Outcome] = []
    h.submit(Draft("r", A, 1, "before", "k0"), outcomes.append)
    await h.drain()
    h.submit(Draft("r", A, 3, "edit", "k1", target=2**64), outcomes.append)  # alone
    await h.drain()
    for i in range(3):  # in one group with another
        h.submit(Draft("r", A, 3 if i == 1 else 1, f"m{i}", f"g{i}", target=2**64 * (i == 1)),
                 outcomes.append)
    await h.drain()
    h.submit(Draft("r", A, 1, "after", "k2"), outcomes.append)
    await h.drain()
    assert isinstance(outcomes[0], Written) and isinstance(outcomes[1], StoreError)
    assert "not stored" in str(outcomes[1])
    assert isinstance(outcomes[-1], Written)
    stored = [m.text for m in await h.after("r", 0, 10)]
    assert stored[0] == "before" and stored[-1] == "after"
    await h.close()


async def test_reads_are_answered_while_another_process_holds_the_write_lock(
        tmp_path: Path) -> None:
    h = await SqliteHistory.open(tmp_path / "db", wait=60)
    h.submit(Draft("r", A, 1, "stored"), lambda o: None)
    await h.drain()
    outcomes: list[Outcome] = []
    async with write_lock_held(tmp_path / "db") as lock:
        h.submit(Draft("r", A, 1, "waiting"), outcomes.append)
        await until(lambda: h.pending() == 1, "the message waits for the lock")
        assert [m.text for m in await h.after("r", 0, 10)] == ["stored"]
        assert await h.revocations_since(0) == ([], 0)
        assert outcomes == [] and lock.held
    await h.drain()
    assert [o.message.id for o in outcomes if isinstance(o, Written)] == [2]
    await h.close()


async def test_while_the_lock_outlasts_the_wait_every_waiting_message_is_refused(
        tmp_path: Path) -> None:
    h = await SqliteHistory.open(tmp_path / "db", wait=0.2)
    outcomes: list[Outcome] = []
    async with write_lock_held(tmp_path / "db"):
        for i in range(5):
            h.submit(Draft("r", A, 1, f"m{i}"), outcomes.append)
        await h.drain()
    assert len(outcomes) == 5 and all(isinstance(o, StoreError) for o in outcomes)
    assert all("did not take this message within 0.2s" in str(o) for o in outcomes)
    h.submit(Draft("r", A, 1, "again"), outcomes.append)
    await h.drain()
    again = outcomes[-1]
    assert isinstance(again, Written) and again.message.id == 1  # no id was used up
    await h.close()


async def test_a_full_disk_refuses_the_group_and_the_history_goes_on(tmp_path: Path) -> None:
    h = await SqliteHistory.open(tmp_path / "db")
    outcomes: list[Outcome] = []
    real = h._store._db
    h._store._db = FullDisk(real)  # type: ignore[assignment]
    for i in range(3):
        h.submit(Draft("r", A, 1, f"m{i}"), outcomes.append)
    await h.drain()
    h._store._db = real
    assert [type(o) for o in outcomes] == [StoreError] * 3
    h.submit(Draft("r", A, 1, "after"), outcomes.append)
    await h.drain()
    assert isinstance(outcomes[-1], Written) and outcomes[-1].message.id == 1
    assert h.last_id("r") == 1
    await h.close()


async def test_token_writes_and_retention_run_between_groups(tmp_path: Path) -> None:
    h = await SqliteHistory.open(tmp_path / "db")
    for i in range(10):
        h.submit(Draft("r", A, 1, f"m{i}"), lambda o: None)
    assert await h.revoke("t1") and not await h.revoke("t1")
    assert await h.prune(keep_count=4, keep_days=0) == 6
    assert (await h.revocations_since(0))[0] == ["t1"]
    assert [m.id for m in await h.after("r", 0, 100)] == [7, 8, 9, 10]
    await h.close()


async def test_a_caller_that_stops_waiting_for_its_job_leaves_the_writer_working(
        tmp_path: Path) -> None:
    h = await SqliteHistory.open(tmp_path / "db")
    taken, release = threading.Event(), threading.Event()

    def hold(_: Any) -> bool:
        taken.set()
        return release.wait(10)

    busy = asyncio.ensure_future(h._job(hold))
    await asyncio.to_thread(taken.wait, 5)  # the writer is inside the first job
    gone = asyncio.ensure_future(h.revoke("t1"))  # queued behind it
    await asyncio.sleep(0.05)
    gone.cancel()
    await asyncio.sleep(0.05)
    release.set()
    assert await busy
    assert await asyncio.wait_for(h.revoke("t2"), 5)  # the writer thread is still there
    assert (await h.revocations_since(0))[0] == ["t2"]  # the abandoned job was dropped
    await h.close()


async def test_closing_settles_what_was_submitted(tmp_path: Path) -> None:
    h = await SqliteHistory.open(tmp_path / "db")
    outcomes: list[Outcome] = []
    for i in range(50):
        h.submit(Draft("r", A, 1, f"m{i}"), outcomes.append)
    await asyncio.wait_for(h.close(), 10)
    assert len(outcomes) == 50 and all(isinstance(o, Written) for o in outcomes)


# --- issue 18: storage an operator can trust ------------------------------------------------


class ReadOnlyDisk:
    """A connection on a disk with no room left: every write statement fails."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.split()[0].upper() in ("BEGIN", "INSERT", "UPDATE", "DELETE", "COMMIT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        raise sqlite3.OperationalError("database or disk is full")


def test_retention_with_nothing_to_delete_writes_nothing(tmp_path: Path) -> None:
    """So it cannot fail on a full disk (a restart used to fail right there)."""
    s = Store(tmp_path / "db")
    for i in range(5):
        s.append("r", A, 1, f"m{i}")
    s.prune(keep_count=2, keep_days=0)
    real = s._db
    s._db = ReadOnlyDisk(real)  # type: ignore[assignment]
    assert s.prune(keep_count=2, keep_days=0) == 0  # already pruned
    assert s.prune(keep_count=0, keep_days=0) == 0  # retention off
    assert s.prune(keep_count=0, keep_days=30) == 0  # nothing that old
    with pytest.raises(StoreError, match="disk is full"):
        s.prune(keep_count=1, keep_days=0)  # something to delete: it needs the disk
    s._db = real
    assert [m.id for m in s.after("r", 0, 10)] == [4, 5]
    s.close()


def test_database_files_are_created_private(tmp_path: Path) -> None:
    s = Store(tmp_path / "state" / "db")
    s.append("r", A, 1, "m")
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names == ["db", "db-shm", "db-wal"]
    for p in (tmp_path / "state").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    s.close()


def test_an_empty_history_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A zero-length file is a truncated or replaced database, never a new one (new ones are
    made with their tables, under another name): starting on it would silently show an empty
    history and forget every token record."""
    s = Store(tmp_path / "db")
    s.append("r", A, 1, "m")
    s.close()
    (tmp_path / "db").write_bytes(b"")
    with pytest.raises(StoreError) as e:
        Store(tmp_path / "db")
    assert "is empty (0 bytes)" in str(e.value)
    assert "tsnetchat restore BACKUP" in str(e.value) and "delete the file" in str(e.value)
    assert (tmp_path / "db").stat().st_size == 0  # left as it was
    (tmp_path / "db").unlink()
    assert Store(tmp_path / "db").last_ids() == {}  # deleted: a new, empty history


def test_a_history_has_an_identity_that_survives_reopening_and_a_generation(
        tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    first = s.identity()
    assert first.generation == 1 and len(first.history_id) == 32
    s.close()
    s = Store(tmp_path / "db")
    assert s.identity() == first
    assert s.next_generation(above=5) == (first.history_id, 6)
    s.close()
    other = Store(tmp_path / "other")
    assert other.identity().history_id != first.history_id
    other.close()


def test_a_schema_2_database_gains_an_identity_keeping_its_messages(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    s.append("r", A, 1, "kept")
    s.close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("DROP TABLE meta")
    db.execute("PRAGMA user_version=2")
    db.close()
    s = Store(tmp_path / "db")
    assert s.identity().generation == 1
    assert [m.text for m in s.after("r", 0, 10)] == ["kept"]
    s.close()


def test_the_wal_shrinks_back_after_a_burst(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst while a reader holds an old snapshot grows the WAL (no checkpoint can catch
    up); once the reader is gone the next checkpoint truncates it to WAL_SIZE_LIMIT instead of
    keeping the burst's size on disk for good. (With the limit at 4 MB: a burst past the real
    64 MB would take the test a while.)"""
    limit = 4 * 1024 * 1024
    assert limit < store_module.WAL_SIZE_LIMIT
    monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT", limit)
    s = Store(tmp_path / "db")
    s.append("r", A, 1, "first")
    reader = sqlite3.connect(tmp_path / "db")
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM messages").fetchone()  # holds its snapshot
    for _ in range(0, 4000, 50):
        s.write([Draft("r", A, 1, "x" * 1000) for _ in range(50)])
    wal = tmp_path / "db-wal"
    burst = wal.stat().st_size
    assert burst > 2 * limit
    reader.execute("COMMIT")
    reader.close()
    other = sqlite3.connect(tmp_path / "db")  # a checkpoint as _Checkpointer runs it
    while True:  # (until it catches up; the store's own checkpointer may be busy at it)
        busy, log, done = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if not busy and log == done:
            break
        time.sleep(0.01)
    other.close()
    assert wal.stat().st_size == burst  # (a checkpoint alone leaves the file as it is)
    s.append("r", A, 1, "next")  # the writer starts the WAL over: and cuts it down
    assert wal.stat().st_size <= limit
    assert s.after("r", 4000, 10)[-1].text == "next"
    s.close()


def test_ranked_search_fills_its_window_only_with_messages_the_caller_may_read(
        tmp_path: Path) -> None:
    s = Store(tmp_path / "h.db")
    who = Sender("a@x", "A", "n")
    s.write([Draft("open", who, 1, f"kiwi open {i}") for i in range(3)])
    # Newer than every open match, and more of them than the ranked window holds.
    s.write([Draft("secret", who, 1, "kiwi kiwi kiwi secret") for _ in range(RANK_WINDOW + 5)])
    found = s.search("kiwi", ["open"], limit=50)
    assert sorted(m.text for m in found) == ["kiwi open 0", "kiwi open 1", "kiwi open 2"]
    ranked = s.search("kiwi", ["open", "secret"], limit=50, offset=RANK_WINDOW - 2)
    assert len(ranked) == 2  # ranked pages end with the window
    assert all(m.room == "secret" for m in ranked)
    s.close()


def test_a_message_read_back_carries_the_mentions_stored_with_it(tmp_path: Path) -> None:
    s = Store(tmp_path / "h.db")
    who = Sender("a@x", "A", "n")
    expected = ("bob@x", "carol@x")
    (w,) = s.write([Draft("r", who, 1, "bob and carol: kiwi", mentions=expected)])
    assert isinstance(w, Written)
    assert w.message.mentions == expected
    s.write([Draft("r", who, 1, "nobody")])
    assert [m.mentions for m in s.after("r", 0, 10)] == [expected, ()]
    assert [m.mentions for m in s.search("kiwi", ["r"])] == [expected]
    assert [m.mentions for m in s.mentions_of("bob@x", include_read=True, limit=5)] == [expected]
    s.close()


def test_messages_changed_before_the_search_index_took_them_are_found_as_they_are_now(
        tmp_path: Path) -> None:
    """New messages are indexed in batches (schema 4): an edit or deletion that comes before
    the batch must leave the index as if it had followed it."""
    s = Store(tmp_path / "h.db")
    (kept,) = s.write([Draft("r", A, 1, "plum before")])
    s.search("plum", ["r"])  # indexes what there is: "plum before"
    (edited, gone) = s.write([Draft("r", A, 1, "apple draft"), Draft("r", A, 1, "apple secret")])
    assert isinstance(kept, Written) and isinstance(edited, Written)
    assert isinstance(gone, Written)
    s.write([Draft("r", A, 3, "pear final", target=edited.message.id),
             Draft("r", A, 4, "", target=gone.message.id)])
    s.write([Draft("r", A, 3, "plum after", target=kept.message.id)])  # an indexed one
    assert [m.text for m in s.search("pear", ["r"])] == ["pear final"]
    assert s.search("apple", ["r"]) == []
    assert s.search("secret", ["r"]) == []
    assert [m.text for m in s.search("plum", ["r"])] == ["plum after"]
    assert s.search("before", ["r"]) == []
    s.close()


def test_search_finds_the_same_whether_it_reads_small_rooms_message_by_message_or_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small rooms are searched message by message (SEARCH_BY_ROOM), larger ones from the
    words' lists: both ways give the same pages newest first, and the same matches ranked
    (small rooms weigh words against the caller's rooms, so the order may differ)."""
    rng = random.Random(15)
    words = ["kiwi", "plum", "fig", "pear", "lime"]
    s = Store(tmp_path / "h.db")
    people = [A, Sender("b@example.com", "B", "b-laptop.example.ts.net")]
    for room in ("big", "small", "other"):
        for i in range({"small": 15}.get(room, 400)):
            s.write([Draft(room, rng.choice(people), 1,
                           " ".join(rng.choices(words, k=rng.randint(1, 6))))], now_ms=1000 * i)
    asks: list[tuple[str, list[str], dict[str, Any]]] = [
        ("kiwi", ["small"], {}), ("kiwi plum", ["small", "big"], {}),
        ("fig", ["big"], {"author": "b@example.com"}),
        ("pear", ["small", "other"], {"since_ms": 100_000, "until_ms": 300_000}),
        ("li*", ["big", "other", "small"], {}), ("plum", ["nowhere"], {})]
    newest, ranked, pages = {}, {}, {}
    for by_room in (0, 10_000):
        monkeypatch.setattr(store_module, "SEARCH_BY_ROOM", by_room)
        newest[by_room] = [[(m.room, m.id) for m in s.search(
            q, rooms, newest=True, limit=7, offset=3, **kw)] for q, rooms, kw in asks]
        ranked[by_room] = [sorted((m.room, m.id) for m in s.search(
            q, rooms, limit=RANK_WINDOW, **kw)) for q, rooms, kw in asks]
        pages[by_room] = [len(s.search(q, rooms, limit=5, offset=2, **kw))
                          for q, rooms, kw in asks]
    assert newest[0] == newest[10_000]
    assert ranked[0] == ranked[10_000]
    assert pages[0] == pages[10_000]
    assert all(ranked[0][:5]) and ranked[0][5] == []
    s.close()


def test_ranked_search_in_a_small_room_puts_the_best_match_first(tmp_path: Path) -> None:
    s = Store(tmp_path / "h.db")
    s.write([Draft("dm:a,b", A, 1, t) for t in (
        "kiwi and a great many other words around it in a long line", "kiwi kiwi kiwi",
        "nothing here")])
    assert store_module.SEARCH_BY_ROOM >= 3
    assert [m.text for m in s.search("kiwi", ["dm:a,b"])] == [
        "kiwi kiwi kiwi", "kiwi and a great many other words around it in a long line"]
    s.close()


@pytest.mark.parametrize("by_room", [0, 10_000])
def test_a_word_inside_a_sentence_written_without_spaces_is_found_in_the_rooms_searched_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by_room: int) -> None:
    """FTS5's tokenizer takes a run of CJK (Thai, Korean...) letters as one token: such words
    are looked for in the text, in small rooms and large (SEARCH_BY_ROOM), reading the table
    in its order (the rooms hold most of it) or through one room's index."""
    monkeypatch.setattr(store_module, "SEARCH_BY_ROOM", by_room)
    s = Store(tmp_path / "h.db")
    s.write([Draft("filler", A, 1, f"plain words {i}") for i in range(300)])
    s.write([Draft("jp", A, 1, t) for t in (
        "明日は東京タワーに行く", "東京 kiwi", "iPhone買った", "大阪にいます",
        "서울에서 만나요", "ไปกินข้าวกันไหม")])
    (gone,) = s.write([Draft("jp", A, 1, "東京駅は秘密")])
    assert isinstance(gone, Written)
    s.write([Draft("jp", A, 4, "", target=gone.message.id)])
    s.write([Draft("secret", A, 1, "東京の秘密")])
    for rooms in (["jp"], ["jp", "filler"]):  # (through the room's index; the table read)
        texts = [m.text for m in s.search("東京", rooms, limit=10)]
        assert texts == ["東京 kiwi", "明日は東京タワーに行く"], rooms
        assert [m.text for m in s.search("東京 kiwi", rooms)] == ["東京 kiwi"]
        found = s.search("タワー", rooms, newest=True)
        assert [m.text for m in found] == ["明日は東京タワーに行く"]
        assert [m.text for m in s.search("iphone買", rooms)] == ["iPhone買った"]
        assert [m.text for m in s.search("서울", rooms)] == ["서울에서 만나요"]
        assert [m.text for m in s.search("กินข้าว", rooms)] == ["ไปกินข้าวกันไหม"]
        assert s.search("秘密", rooms) == []  # deleted, or in a room not searched
        assert [m.text for m in s.search("東京", rooms, limit=1, offset=1)] == [
            "明日は東京タワーに行く"]
        assert s.search("東京", rooms, author="b@example.com") == []
    s.close()


@pytest.mark.security
def test_a_search_of_more_words_read_in_the_text_than_a_few_is_refused_in_words(
        tmp_path: Path) -> None:
    """Each word looked for inside the text (CJK, Thai, Korean ...) is one more reading of
    every message searched: 62 one-letter words, each found only at the end of 20,000
    messages of 4 KiB a person had written, took 4 s a search where one word took 77 ms
    (an attacker's run, 2026-11-25), and 30 a minute kept both of the store's readers busy
    for everyone. A few such words are looked for; more are refused, as is a query of
    punctuation, before anything is read."""
    letters = [chr(0x4e00 + i) for i in range(62)]
    s = Store(tmp_path / "h.db")
    s.write([Draft("jp", A, 1, "x" * 100 + "".join(letters))])
    few = " ".join(letters[:4])  # ("東京 タワー 行く": three)
    assert len(s.search(few, ["jp"])) == 1
    assert len(s.search(few + " x*", ["jp"])) == 1  # (words the index finds are not counted)
    with pytest.raises(InvalidInput, match=r"at most \d+ words in Chinese"):
        store_module.search_words(" ".join(letters))
    with pytest.raises(InvalidInput, match=r"at most \d+ words in Chinese"):
        s.search(" ".join(letters), ["jp"])
    s.close()


def test_a_thai_khmer_or_burmese_word_is_looked_for_whole_with_its_vowel_signs(
        tmp_path: Path) -> None:
    """Python's \\w is not a vowel sign (a combining mark), so "กินข้าว" (to eat) was looked
    for as "ก", "นข" and "าว" anywhere in a message, found where those pieces stood in other
    words, and a Khmer word was 6 pieces, more than a search may look for inside the text."""
    s = Store(tmp_path / "h.db")
    s.write([Draft("th", A, 1, t) for t in (
        "ไปกินข้าวกันไหม", "กานขาวนข", "ខ្ញុំស្រឡាញ់អ្នក", "မင်္ဂလာပါ")])
    assert store_module.search_words("กินข้าว").inside == ("กินข้าว",)
    assert [m.text for m in s.search("กินข้าว", ["th"])] == ["ไปกินข้าวกันไหม"]
    assert [m.text for m in s.search("ស្រឡាញ់", ["th"])] == ["ខ្ញុំស្រឡាញ់អ្នក"]
    assert [m.text for m in s.search("မင်္ဂလာ", ["th"])] == ["မင်္ဂလာပါ"]
    s.close()


def test_a_search_of_only_punctuation_is_refused_in_words() -> None:
    with pytest.raises(InvalidInput, match="no words to look for"):
        store_module.search_words("、。!?")


async def test_a_member_removed_by_a_caller_that_stopped_waiting_is_removed_for_the_loop_too(
        tmp_path: Path) -> None:
    """The change is committed by the writer thread even when its caller is cancelled while
    it waits for the lock (an admin's deadline, a hang-up); the loop's copy, which every
    access decision reads, kept the removed member in the room until a restart."""
    history = await SqliteHistory.open(tmp_path / "db", wait=5.0)
    try:
        await history.set_members("+ops", "root@example.com",
                                  ["alice@example.com", "bob@example.com"], (), create=True)
        async with write_lock_held(tmp_path / "db") as lock:
            change = asyncio.ensure_future(history.set_members(
                "+ops", "root@example.com", (), ["bob@example.com"]))
            await asyncio.sleep(0.3)  # the writer runs the change, waiting for the lock
            change.cancel()
            with pytest.raises(asyncio.CancelledError):
                await change
            await lock.release()
        await history.job(lambda s: None)  # (after the change, in order)
        stored = await history.read(lambda s: s.private_rooms())
        assert stored["+ops"] == {"alice@example.com"}
        assert history.private_members("+ops") == {"alice@example.com"}
    finally:
        await history.close()


@pytest.mark.parametrize("draft", [
    Draft("r", A, 1, "hi b", "k1", mentions=("b@example.com",)),
    Draft("r", A, 5, "the topic", "k1"),
    Draft("r", A, 3, "edited", "k1", target=1)])
async def test_a_lone_message_of_several_statements_is_stored_whole_or_not_at_all(
        tmp_path: Path, draft: Draft) -> None:
    """A lone message into a known room from a known sender is written without a
    transaction of its own (one statement, SQLite's own). A mention, a topic or an edit
    takes more statements: when a later one failed (a full disk, another process taking
    the lock in between), the message stayed stored while its sender was told it was not;
    sent again, it was acknowledged as a resend and never shown to the room."""
    h = await SqliteHistory.open(tmp_path / "db")
    try:
        outcomes: list[Outcome] = []
        h.submit(Draft("r", A, 1, "first", "k0"), outcomes.append)  # (room and sender known)
        await h.drain()
        await h.job(lambda s: [s._db.execute(  # a later statement fails, as on a full disk
            f"CREATE TEMP TRIGGER fail_{n} BEFORE INSERT ON main.{t} {when} "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
            for n, (t, when) in enumerate([("mentions", ""), ("topics", ""),
                                           ("messages", "WHEN new.kind = 3")])])
        h.submit(draft, outcomes.append)
        await h.drain()
        assert isinstance(outcomes[-1], StoreError), outcomes[-1]
        stored = await h.read(lambda s: s._q("SELECT id, text FROM messages"))
        assert [tuple(r) for r in stored] == [(1, "first")]
    finally:
        await h.close()


async def test_the_history_counts_its_commits_and_the_messages_they_held(
        tmp_path: Path) -> None:
    """What group commit gathers, for the metrics: 21 messages waiting for a lock another
    process holds are written in one or two commits (the first may be taken alone)."""
    h = await SqliteHistory.open(tmp_path / "db")
    h.submit(Draft("r", A, 1, "first", "k"), lambda outcome: None)
    await h.drain()
    assert (h.commits, h.committed) == (1, 1)
    async with write_lock_held(tmp_path / "db") as lock:
        for i in range(21):
            h.submit(Draft("r", A, 1, f"m{i}", f"k{i}"), lambda outcome: None)
        await until(lambda: h.pending() == 21, "the messages wait for the lock")
        await lock.release()
        await h.drain()
    assert h.committed == 22 and h.commits in (2, 3), (h.commits, h.committed)
    await h.close()


def test_retention_takes_the_mentions_of_what_it_deletes_with_it(tmp_path: Path) -> None:
    """An unread mention count is read from the mentions alone: one left behind counted a
    message nobody can read any more."""
    s = Store(tmp_path / "db")
    s.write([Draft("r", A, 1, "b: old news", "", 0, ("b@example.com",))], now_ms=1000)
    s.append("r", A, 1, "new", now_ms=10**9)
    assert s.prune(keep_count=1, keep_days=0) == 1
    (state,) = s.unread("b@example.com", ["r"])
    assert (state.unread, state.mentions) == (1, 0)
    s.close()


def test_creating_a_private_room_that_exists_is_bad_input_and_changes_nothing(
        tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    assert s.set_members("+ops", "root", ["a@example.com"], [], create=True) == {"a@example.com"}
    with pytest.raises(InvalidInput, match="private room '\\+ops' already exists"):
        s.set_members("+ops", "mallory", ["m@example.com"], [], create=True)
    assert s.private_rooms() == {"+ops": frozenset({"a@example.com"})}
    s.close()


def test_a_search_until_a_time_leaves_out_what_was_sent_at_that_time(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    for i in range(3):
        s.append("r", A, 1, f"heron {i}", now_ms=1000 * (i + 1))
    found = s.search("heron", ["r"], since_ms=1000, until_ms=3000, newest=True)
    assert [m.text for m in found] == ["heron 1", "heron 0"]
    s.close()


async def test_a_send_made_on_hearing_a_held_write_returned_is_taken(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A write a hung disk holds, and two messages behind it refused as overdue: once the
    write returns, a message sent on hearing so is stored. It was refused as "not taking
    messages" while the writer had not yet come back for the two refused ones (here held
    right after it posts the write's outcome, as a loaded machine's scheduler may)."""
    h = await SqliteHistory.open(tmp_path / "db", wait=0.3)
    h.submit(Draft("r", A, 1, "first", "k0"), lambda outcome: None)  # (room and sender known)
    await h.drain()
    disk, resent = threading.Event(), threading.Event()
    write_one, post = h._store.write_one, h._post

    def hung_write(*args: Any) -> Any:
        written = write_one(*args)
        disk.wait(10)  # (its commit's fsync, held)
        return written

    monkeypatch.setattr(h._store, "write_one", hung_write)

    def post_then_hold(results: Any) -> None:
        post(results)
        resent.wait(10)

    monkeypatch.setattr(h, "_post", post_then_hold)
    outcomes: dict[str, Outcome] = {}

    def resend(outcome: Outcome) -> None:
        outcomes["a"] = outcome
        h.submit(Draft("r", A, 1, "b", "kb"), lambda o: outcomes.__setitem__("b again", o))
        resent.set()

    try:
        h.submit(Draft("r", A, 1, "a", "ka"), resend)
        await until(lambda: h._writing)  # (the writer is in a's write)
        for k in "bc":
            h.submit(Draft("r", A, 1, k, f"k{k}"), lambda o, k=k: outcomes.__setitem__(k, o))
        await until(lambda: {"b", "c"} <= outcomes.keys(), timeout=5)
        assert all(isinstance(outcomes[k], StoreError) for k in "bc"), outcomes
        disk.set()
        await until(lambda: "b again" in outcomes, timeout=10)
        assert isinstance(outcomes["a"], Written), outcomes
        assert isinstance(outcomes["b again"], Written), outcomes["b again"]
    finally:
        disk.set()
        resent.set()
        await h.close()
