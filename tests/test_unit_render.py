"""How text from someone else is shown (tsnetchat.render): one rule everywhere."""

from __future__ import annotations

import pytest

from tsnetchat import render
from tsnetchat.chatview import plain_lines
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
