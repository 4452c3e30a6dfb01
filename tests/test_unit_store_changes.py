"""Edits and deletions as the history decides them, in the transaction that stores them
(store.Draft's rules), against real SQLite in a temp dir: the author within the edit
window; an admin may delete anything, and edit nothing of anybody else's; what is deleted
stays deleted, its edits' text too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsnetchat.errors import InvalidInput, PermissionDenied
from tsnetchat.store import ACTION, DELETE, EDIT, TEXT, TOPIC, Draft, Refused, Sender, Store

A = Sender("a@example.com", "A", "a-laptop")
B = Sender("b@example.com", "B", "b-laptop")
WINDOW_MS = 60_000
SENT = 1_000_000


def change(s: Store, who: Sender, kind: int, target: int, *, at: int, admin: bool = False,
           text: str = "") -> int | Exception:
    """The id of the EDIT or DELETE event stored, or the error it was refused with."""
    (out,) = s.write([Draft("r", who, kind, text if kind == EDIT else "", "", target, (),
                            admin, WINDOW_MS)], now_ms=at)
    return out.error if isinstance(out, Refused) else out.message.id


@pytest.fixture
def s(tmp_path: Path) -> Store:
    store = Store(tmp_path / "db")
    store.append("r", A, TEXT, "hello", now_ms=SENT)  # 1
    return store


def test_an_author_changes_a_message_within_the_edit_window_and_not_after(s: Store) -> None:
    assert change(s, A, EDIT, 1, at=SENT + WINDOW_MS, text="hello!") == 2
    late = change(s, A, EDIT, 1, at=SENT + WINDOW_MS + 1, text="hello?")
    assert isinstance(late, PermissionDenied) and "edit window" in str(late)
    late = change(s, A, DELETE, 1, at=SENT + WINDOW_MS + 1)
    assert isinstance(late, PermissionDenied) and "edit window" in str(late)
    assert s.after("r", 0, 10)[0].text == "hello!"


def test_an_admin_deletes_anybodys_message_at_any_time_and_edits_only_their_own(
        s: Store) -> None:
    refused = change(s, B, EDIT, 1, at=SENT + 1, admin=True, text="hijacked")
    assert isinstance(refused, PermissionDenied)
    assert str(refused) == "only its author can edit a message"
    s.append("r", B, TEXT, "the admin's own", now_ms=SENT)  # 2
    late = change(s, B, EDIT, 2, at=SENT + WINDOW_MS + 1, admin=True, text="rewritten")
    assert isinstance(late, PermissionDenied) and "edit window" in str(late)
    assert change(s, B, DELETE, 1, at=SENT + 10 * WINDOW_MS, admin=True) == 3
    assert [(m.text, m.deleted_by) for m in s.after("r", 0, 2)] == [
        ("", B.login), ("the admin's own", "")]


def test_a_deleted_message_is_neither_edited_nor_deleted_again(s: Store) -> None:
    assert change(s, A, DELETE, 1, at=SENT + 1) == 2
    for kind in (EDIT, DELETE):
        again = change(s, A, kind, 1, at=SENT + 2, text="back")
        assert isinstance(again, InvalidInput) and str(again) == "message 1 was already deleted"
    assert [m.kind for m in s.after("r", 0, 10)] == [TEXT, DELETE]


@pytest.mark.parametrize("kind", [EDIT, DELETE, TOPIC])
def test_only_a_text_or_action_message_is_a_target(s: Store, kind: int) -> None:
    """An edit, a deletion or a topic is an event about something: editing it (or deleting
    it) would change what the history says happened."""
    s.append("r", A, ACTION, "waves", now_ms=SENT)  # 2: an action is a target like text
    assert change(s, A, EDIT, 2, at=SENT + 1, text="waves back") == 3
    event = (change(s, A, kind, 1, at=SENT + 2, text="x") if kind != TOPIC
             else s.append("r", A, TOPIC, "a topic", now_ms=SENT + 2)[0].id)
    assert event == 4
    for k in (EDIT, DELETE):
        refused = change(s, A, k, 4, at=SENT + 3, text="y")
        assert isinstance(refused, InvalidInput)
        assert str(refused).startswith("there is no message 4 in 'r' to ")


def test_deleting_a_message_also_blanks_the_text_of_its_edits(s: Store) -> None:
    assert change(s, A, EDIT, 1, at=SENT + 1, text="a secret I regret") == 2
    assert change(s, A, DELETE, 1, at=SENT + 2) == 3
    rows = s.after("r", 0, 10)
    assert [(m.kind, m.text) for m in rows] == [(TEXT, ""), (EDIT, ""), (DELETE, "")]
    assert not s.search("regret", ["r"])


def test_read_positions_only_move_forward(s: Store) -> None:
    s.mark_read([("a@example.com", "r", 5)])
    s.mark_read([("a@example.com", "r", 3)])
    assert s.read_mark("a@example.com", "r") == 5


def test_a_deleted_message_is_neither_unread_nor_a_mention_any_more(s: Store) -> None:
    s.write([Draft("r", A, TEXT, "b: look", "", 0, ("b@example.com",))], now_ms=SENT)  # 2
    (before,) = s.unread("b@example.com", ["r"])
    assert (before.unread, before.mentions) == (2, 1)
    assert [m.id for m in s.mentions_of("b@example.com", include_read=True, limit=10)] == [2]
    assert change(s, A, DELETE, 2, at=SENT + 1) == 3
    (after,) = s.unread("b@example.com", ["r"])
    assert (after.unread, after.mentions) == (1, 0)
    assert s.mentions_of("b@example.com", include_read=True, limit=10) == []


def test_an_edit_naming_someone_mentions_them_in_the_message_edited_not_in_the_edit(
        s: Store) -> None:
    (out,) = s.write([Draft("r", A, EDIT, "hello b", "", 1, ("b@example.com",), False,
                            WINDOW_MS)], now_ms=SENT + 1)
    assert not isinstance(out, Refused) and out.message.id == 2
    assert [m.id for m in s.mentions_of("b@example.com", include_read=True, limit=10)] == [1]
    (state,) = s.unread("b@example.com", ["r"])
    assert state.mentions == 1


def test_an_id_already_used_for_another_message_is_refused_and_a_resend_is_answered_as_stored(
        tmp_path: Path) -> None:
    """An edit sent under the client_msg_id of the message it edits was answered as that
    message (a resend) and never applied (a mutation test, 2026-11-25)."""
    s = Store(tmp_path / "db")
    (first,) = s.write([Draft("r", A, TEXT, "hello", "k1")], now_ms=SENT)
    (again,) = s.write([Draft("r", A, TEXT, "hello", "k1")], now_ms=SENT + 1)
    assert not isinstance(first, Refused) and not isinstance(again, Refused)
    assert (again.duplicate, again.message.id) == (True, first.message.id)
    (edit,) = s.write([Draft("r", A, EDIT, "hello!", "k1", first.message.id, (), False,
                             WINDOW_MS)], now_ms=SENT + 2)
    assert isinstance(edit, Refused) and isinstance(edit.error, InvalidInput), edit
    assert str(edit.error) == ("client_msg_id 'k1' already names another of your messages "
                               "here (id 1); give each message an id of its own")
    assert [(m.kind, m.text) for m in s.after("r", 0, 10)] == [(TEXT, "hello")]
