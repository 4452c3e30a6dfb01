"""Storage rules against real SQLite in a temp dir."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from tsnetchat.errors import StoreError
from tsnetchat.store import Sender, Store

# --- storage ------------------------------------------------------------------------------


def test_retention_keeps_ids_increasing_and_never_reused(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    a = Sender("a", "A", "n")
    for i in range(10):
        s.append("r", a, 1, f"m{i}", now_ms=1000 * i)
    assert s.prune(keep_count=3, keep_days=0) == 7
    assert [m.id for m in s.after("r", 0, 100)] == [8, 9, 10]
    s.close()
    s = Store(tmp_path / "db")
    assert s.append("r", a, 1, "next")[0].id == 11
    assert s.prune(keep_count=0, keep_days=1, now=10**6) == 3  # m7..m9 are old by then
    s.close()


def test_checkpoints_run_beside_the_writer_and_the_wal_stays_bounded(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    a = Sender("a", "A", "n")
    rounds = 40  # back to back, as a saturated server writes
    one_round = 0
    for i in range(rounds * Store.CHECKPOINT_EVERY):
        s.append("r", a, 1, f"m{i}", f"k{i}")
        if i == Store.CHECKPOINT_EVERY - 2:
            one_round = (tmp_path / "db-wal").stat().st_size  # before any checkpoint
    assert s.checkpointer is not None and s.checkpointer.runs >= 1
    # Without a checkpoint that catches up the WAL would hold all forty rounds of commits.
    assert (tmp_path / "db-wal").stat().st_size < rounds * one_round / 3
    s.close()
    assert [m.id for m in Store(tmp_path / "db").after("r", 3995, 10)] == [3996, 3997, 3998,
                                                                             3999, 4000]


def test_deferred_appends_are_invisible_until_commit_then_call_back_in_order(
        tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    other = sqlite3.connect(tmp_path / "db")  # what a crash would leave behind
    done: list[tuple[int, bool, StoreError | None]] = []
    for i in range(3):
        s.append_later("r", Sender("a", "A", "n"), 1, f"m{i}", f"k{i}",
                       lambda m, dup, err: done.append((m.id, dup, err)))
    s.append_later("r", Sender("a", "A", "n"), 1, "m1", "k1",  # a resend in the same group
                   lambda m, dup, err: done.append((m.id, dup, err)))
    assert done == [] and s.waiting == 4
    assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    s.commit()
    assert done == [(1, False, None), (2, False, None), (3, False, None), (2, True, None)]
    assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 3
    other.close()
    s.close()


def test_any_other_store_call_commits_deferred_appends_first(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    done: list[int] = []
    s.append_later("r", Sender("a", "A", "n"), 1, "early", "", lambda m, d, e: done.append(m.id))
    assert [m.text for m in s.after("r", 0, 10)] == ["early"]  # committed for the read,
    assert done == [1]  # and the sender was told first
    assert s.append("r", Sender("a", "A", "n"), 1, "next")[0].id == 2
    s.close()


def test_a_failed_group_commit_loses_the_whole_group_and_says_so(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    a = Sender("a", "A", "n")
    s.append("r", a, 1, "kept")
    real = s._db

    class FullDisk:  # the connection, except that COMMIT fails as on a full disk
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

    s._db = FullDisk()  # type: ignore[assignment]
    errors: list[str] = []
    for i in range(2):
        s.append_later("r", a, 1, f"lost{i}", "", lambda m, d, e: errors.append(str(e)))
    s.commit()
    assert errors == ["history database error: database or disk is full"] * 2
    s._db = real
    assert s.last_id("r") == 1  # the lost ids were never seen by anyone
    assert [m.text for m in s.after("r", 0, 10)] == ["kept"]
    assert s.append("r", a, 1, "after")[0].id == 2
    s.close()
