"""How text from someone else is shown (tsnetchat.render): one rule everywhere."""

from __future__ import annotations

import time

import pytest

from tsnetchat import render
from tsnetchat.chatview import PlainView, plain_lines
from tsnetchat.pb import chat_pb2 as pb


@pytest.mark.parametrize("text", ["", " \n\t", "\u200b", "\ufeff\u200b\u2060", "\u3164",
                                  "\u00ad \u200d", "\u2800"])
def test_text_of_only_blank_and_invisible_characters_is_blank(text: str) -> None:
    assert render.is_blank(text)


@pytest.mark.parametrize("text", ["hi", "\u200bx", "😀", "\u0301a", "·"])
def test_text_with_anything_visible_is_not_blank(text: str) -> None:
    assert not render.is_blank(text)


@pytest.mark.parametrize("shown,fallback,expect", [
    ("Eve\x1b[31m\u202eRED", "eve@t", "Eve?[31m?RED"),
    ("Ali\u200bce", "alice@t", "Ali?ce"),
    ("Bob\nBobby", "", "Bob?Bobby"),
    ("\u200b\u200b", "bob@t", "bob@t"),
    ("", "\x1b]0;x\x07bob", "?]0;x?bob"),
    ("x" * 100, "", "x" * 63 + "…"),
])
def test_names_are_one_visible_line_with_nothing_hidden(shown: str, fallback: str,
                                                       expect: str) -> None:
    assert render.name(shown, fallback) == expect


def msg(text: str, kind: int = 1, name: str = "Bob") -> pb.ChatMessage:
    return pb.ChatMessage(id=1, room="general", text=text, kind=kind,  # type: ignore[arg-type]
                          sent_unix_ms=0,
                          sender=pb.Identity(display_name=name, login="bob@t"))


def test_no_line_of_a_message_passes_for_a_message_of_its_own() -> None:
    forged = "hi\n[09:00:00] <Alice> send me your token\n\x1b[2Jcleared"
    first, *rest = plain_lines(msg(forged))
    assert first.endswith(" <Bob> hi")
    # the mark ends where the text column starts
    indent = " " * (len(first) - len("hi") - len(render.CONTINUATION))
    assert rest == [f"{indent}{render.CONTINUATION}[09:00:00] <Alice> send me your token",
                    f"{indent}{render.CONTINUATION}?[2Jcleared"]
    assert all(line.lstrip().startswith(render.CONTINUATION) for line in rest)


def test_actions_and_sanitized_senders_render_on_one_head_line() -> None:
    [line] = plain_lines(msg("waves", kind=2, name="Eve\x1b[31m"))
    assert line.endswith(" * Eve?[31m waves") and "\x1b" not in line


# --- `history` and `tail`: edits, deletions and topics as the chat shows them --------------


def event(mid: int, text: str, *, kind: int = pb.MESSAGE_KIND_TEXT, target: int = 0,
        login: str = "alice@t", name: str = "Alice", minute: int = 0,
        edited: int = 0, deleted_by: str = "") -> pb.ChatMessage:
    ts = int(time.mktime((2026, 11, 22, 9, minute, 0, 0, 0, -1)) * 1000)
    return pb.ChatMessage(id=mid, room="general", text=text, kind=kind, target_id=target,  # type: ignore[arg-type]
                          sent_unix_ms=ts, edited_unix_ms=edited, deleted_by=deleted_by,
                          sender=pb.Identity(login=login, display_name=name))


def printed(msgs: list[pb.ChatMessage]) -> list[str]:
    view = PlainView()
    return [line for m in msgs for line in view.lines(m)]


def test_history_shows_edits_and_deletions_on_their_messages_and_topics_as_notices() -> None:
    # What History gives: messages as they now are, and the change events after them.
    page = [event(1, "the corrected text", edited=1), event(2, "", deleted_by="alice@t"),
            event(3, "release week", kind=pb.MESSAGE_KIND_TOPIC, minute=1),
            event(4, "the corrected text", kind=pb.MESSAGE_KIND_EDIT, target=1, minute=2),
            event(5, "", kind=pb.MESSAGE_KIND_DELETE, target=2, minute=3,
                deleted_by="alice@t"),
            event(6, "", kind=pb.MESSAGE_KIND_TOPIC, minute=4, login="bob@t", name="Bob"),
            event(7, "", kind=pb.MESSAGE_KIND_EDIT, target=99, minute=5)]  # not on this page
    assert printed(page) == [
        "── Sunday 22 November 2026 ──",
        "09:00 <Alice> the corrected text (edited)",
        "09:00 <Alice> (deleted)",
        "09:01 -- Alice set the topic: release week",
        "09:04 -- Bob cleared the topic"]


def test_a_change_arriving_after_its_message_was_printed_is_one_notice() -> None:
    live = [event(1, "the rollback is at 17:00"),
            event(2, "the rollback is at 18:00\nsharp", kind=pb.MESSAGE_KIND_EDIT, target=1,
                minute=1),
            event(3, "", kind=pb.MESSAGE_KIND_DELETE, target=1, minute=2, login="carol@t",
                name="Carol", deleted_by="carol@t")]
    assert printed(live)[1:] == [
        "09:00 <Alice> the rollback is at 17:00",
        "09:01 -- Alice edited their message of 09:00: the rollback is at 18:00",
        "       ┊ sharp",
        "09:02 -- Carol deleted Alice's message of 09:00"]


def test_accents_are_shown_composed_with_their_letters_and_nothing_else_changes() -> None:
    decomposed = "Chloe\u0301 a\u0300 Montre\u0301al \U0001F44D\U0001F3FD \u304b\u3099"
    assert render.visible(decomposed) == (
        "Chlo\u00e9 \u00e0 Montr\u00e9al \U0001F44D\U0001F3FD \u304c")
    assert render.visible("x\u0301") == "x\u0301"  # no such letter: as it came
    # NFC of the whole text would change these: a compatibility ideograph (a glyph variant
    # in a name) and a composition exclusion
    assert render.visible("\ufa19 \u0958") == "\ufa19 \u0958"
    assert render.name("Zoe\u0308") == "Zo\u00eb"
