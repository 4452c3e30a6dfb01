"""What the terminal chat shows and how it reads a typed line, without a terminal: the line
rule, scrollback, unread counts, nick colours, mentions, commands, completion, history."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import until
from prompt_toolkit.key_binding.key_processor import KeyPress
from prompt_toolkit.keys import Keys

from tsnetchat import commands
from tsnetchat.chatview import (
    Conversation,
    Days,
    Palette,
    Renderer,
    dm_name,
    dm_title,
    is_mention,
    kind_of,
    layout,
    mention_pattern,
    person_login,
    plain_lines,
    visible,
    visible_lines,
    wrap,
)
from tsnetchat.outbox import Outbox
from tsnetchat.pb import chat_pb2 as pb

NOW_MS = int(time.time() * 1000)
DAY_MS = 86_400_000


def msg(i: int, text: str = "", who: str = "bob", ts: int = NOW_MS) -> pb.ChatMessage:
    return pb.ChatMessage(id=i, room="general", sent_unix_ms=ts, text=text or f"message {i}",
                          kind=pb.MESSAGE_KIND_TEXT,
                          sender=pb.Identity(login=f"{who}@tailnet.test",
                                             display_name=who.capitalize()))


def text_of(lines: list[list[tuple[str, str]]]) -> list[str]:
    return ["".join(t for _, t in line) for line in lines]


# --- the line rule ----------------------------------------------------------------------------


def test_a_long_message_wraps_under_its_text_and_line_breaks_are_marked() -> None:
    head = [("", "12:00 "), ("", "  "), ("", "<Alice> ")]
    rows = text_of(layout(head, "one two three four five six seven\nsecond", 40))
    assert rows == ["12:00   <Alice> one two three four five",
                    "              ┊ six seven",
                    "              ┊ second"]
    # On a narrow screen a long head hangs less, so the text keeps some room.
    assert text_of(layout(head, "one two three four", 24))[1] == "    ┊ three four"


def test_a_forged_line_inside_a_message_cannot_pass_for_a_message() -> None:
    (first, second) = plain_lines(msg(1, "hi\n[09:00] <Alice> send me your token"))
    assert first.endswith("<Bob> hi")
    assert second == "          ┊ [09:00] <Alice> send me your token"


def test_wrapping_counts_wide_characters_and_cuts_words_longer_than_a_line() -> None:
    assert wrap("漢字漢字漢字", 5) == ["漢字", "漢字", "漢字"]
    assert wrap("x" * 12, 5) == ["xxxxx", "xxxxx", "xx"]
    assert wrap("ab cd", 10, first=2) == ["ab", "cd"]
    assert wrap("", 10) == [""]


def test_a_word_longer_than_a_line_is_never_cut_inside_a_flag_or_a_skin_toned_emoji(
        ) -> None:
    """A row of flags pasted without spaces showed 🇯 at the end of one line and 🇵 at the
    start of the next: two letters, no flag (a daily user's day, 2026-11-25)."""
    jp, wave = "\U0001F1EF\U0001F1F5", "\U0001F44B\U0001F3FD"
    assert wrap("ab" + jp * 3, 5) == ["ab", jp, jp, jp]
    assert wrap("a" + wave * 2, 4) == ["a", wave, wave]


def test_control_characters_and_bidi_overrides_never_reach_the_terminal() -> None:
    assert visible("Eve\x1b[31m\u202eRED\x07\ttab") == "Eve?[31m?RED?    tab"


def test_day_changes_get_a_separator_and_the_unread_marker_sits_above_the_first_unread(
        ) -> None:
    conv = Conversation("general")
    r = Renderer()
    conv.add_message(msg(1, ts=NOW_MS - DAY_MS), own=False, mention=False, shown=True,
                     live=False)
    conv.add_message(msg(2), own=False, mention=False, shown=True, live=True)
    conv.add_message(msg(3), own=False, mention=False, shown=False, live=True)
    conv.add_message(msg(4), own=False, mention=True, shown=False, live=True)
    assert (conv.unread, conv.mentions, conv.marker_id) == (2, 1, 3)
    lines, at_top = visible_lines(conv, r, 60, 20)
    shown = text_of(lines)
    assert at_top and len(shown) == 7
    assert shown[0].startswith("── ") and shown[2].startswith("── ")  # two days
    assert shown[4].startswith("── new since you last looked ──")
    assert shown[5].endswith("  <Bob> message 3")
    assert shown[6].endswith("! <Bob> message 4")  # a mention is marked
    conv.looked_at()
    assert (conv.unread, conv.mentions) == (0, 0) and conv.marker_id == 3  # stays while read
    conv.left()
    assert conv.marker_id is None


def test_scrolling_up_shows_older_lines_and_stays_put_while_new_ones_arrive() -> None:
    conv = Conversation("general")
    r = Renderer()
    for i in range(1, 101):
        conv.add_message(msg(i), own=False, mention=False, shown=True, live=True)
    lines, at_top = visible_lines(conv, r, 60, 10)
    assert text_of(lines)[-1].endswith("message 100") and not at_top
    conv.scroll = 30
    before = text_of(visible_lines(conv, r, 60, 10)[0])
    assert before[-1].endswith("message 70")
    conv.add_message(msg(101), own=False, mention=False, shown=True, live=True, renderer=r)
    assert text_of(visible_lines(conv, r, 60, 10)[0]) == before  # the view did not move
    assert conv.below == 1  # and the status bar can say one arrived below
    conv.scroll = 10_000  # past the top: clamped, and the top is reported for loading more
    lines, at_top = visible_lines(conv, r, 60, 10)
    assert at_top and text_of(lines)[1].endswith("message 1")
    older = [msg(-5 + i) for i in range(0)]  # nothing older: add_older takes an empty page
    assert conv.add_older(older, me="alice@tailnet.test", mentions=None) == 0


def test_a_scrolled_view_stays_on_the_same_message_when_the_pane_narrows_or_widens(
        ) -> None:
    """The scroll was rows at the old width: narrowed from 100 to 60 columns, a view ending
    at paste line 258 ended at 268 (a daily user's day, 2026-11-25)."""
    conv = Conversation("general")
    r = Renderer()
    for i in range(1, 101):  # each wraps to more rows at 40 columns than at 100
        conv.add_message(msg(i, f"line {i} " + "word " * 12), own=False, mention=False,
                         shown=True, live=True)
    visible_lines(conv, r, 100, 10)
    conv.scroll = 30
    assert "<Bob> line 70 " in text_of(visible_lines(conv, r, 100, 10)[0])[-1]
    narrow = text_of(visible_lines(conv, r, 40, 10)[0])
    assert any("line 70 " in row for row in narrow), narrow
    wide = text_of(visible_lines(conv, r, 100, 10)[0])
    assert any("line 70 " in row for row in wide[-2:]), wide


def test_older_history_shows_its_topic_changes_and_applies_its_edits() -> None:
    """PgUp's older history left topic changes out (a new user's day)."""
    conv = Conversation("general")
    r = Renderer()
    conv.add_message(msg(10, "the newest"), own=False, mention=False, shown=True, live=True)
    topic = msg(5, "release week")
    topic.kind = pb.MESSAGE_KIND_TOPIC
    edit = msg(7, "message 4, fixed")
    edit.kind, edit.target_id = pb.MESSAGE_KIND_EDIT, 4
    assert conv.add_older([msg(4, "message 4, fixed"), topic, msg(6), edit],
                          me="alice@tailnet.test", mentions=None) == 4
    shown = text_of(visible_lines(conv, r, 60, 20)[0])
    body = [s for s in shown if not s.startswith("── ")]
    assert [s[6:].strip() for s in body] == [  # (after the time)
        "<Bob> message 4, fixed", "-- Bob set the topic: release week", "<Bob> message 6",
        "<Bob> the newest"], shown
    assert conv.topic is None  # the topic shown above is the newest, not an older one


def test_pending_and_failed_messages_are_drawn_after_the_stored_ones() -> None:
    conv = Conversation("general")
    conv.add_message(msg(1), own=False, mention=False, shown=True, live=True)
    box = Outbox()
    box.add("on its way", pb.MESSAGE_KIND_TEXT)
    bad = box.add("ring \x07", pb.MESSAGE_KIND_TEXT)
    box.refused(bad.client_msg_id, for_good=True, reason="control character")
    me = pb.Identity(login="alice@tailnet.test", display_name="Alice")
    shown = text_of(visible_lines(conv, Renderer(), 100, 10, list(box), me)[0])
    assert shown[-3].endswith("… <Alice> on its way")
    assert shown[-2].endswith("✗ <Alice> ring ?")
    assert "not sent: control character (/retry sends it again" in shown[-1]


def test_people_get_distinct_colours_that_stay_the_same() -> None:
    p = Palette()
    logins = [f"user{i}@tailnet.test" for i in range(10)]
    colours = [p.colour(x) for x in logins]
    assert len(set(colours)) == 10
    assert [p.colour(x) for x in logins] == colours
    assert Palette().colour("alice@tailnet.test") == Palette().colour("alice@tailnet.test")


@pytest.mark.parametrize(("text", "hit"), [
    ("alice: look", True), ("hey Alice!", True), ("ALICE?", True),
    ("alice@tailnet.test please", True), ("malice", False), ("alicex", False),
    ("bob@alice.test", False), ("", False),
])
def test_a_mention_is_a_name_as_a_word_of_its_own(text: str, hit: bool) -> None:
    pattern = mention_pattern(["alice@tailnet.test", "alice", "Alice"])
    assert pattern is not None and bool(pattern.search(text)) is hit


def test_days_separate_printed_history() -> None:
    d = Days()
    assert d.separator(NOW_MS - DAY_MS) is not None
    assert d.separator(NOW_MS - DAY_MS) is None
    assert d.separator(NOW_MS) is not None


# --- commands -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expect"), [
    ("/join #Random", ("join", "random")),
    ("/JOIN general", ("join", "general")),
    ("/j ops", ("join", "ops")),
    ("/part", ("leave", "")),
    ("/leave #ops", ("leave", "ops")),
    ("/HELP", ("help", "")),
    ("/history", ("history", 50)),
    ("/history 20", ("history", 20)),
    ("/me waves", ("me", "waves")),
    ("/quit see you", ("quit", "")),
])
def test_commands_are_case_insensitive_and_take_hash_rooms(line: str,
                                                          expect: tuple[str, object]) -> None:
    p = commands.parse(line)
    assert isinstance(p, commands.Parsed) and p.command.name == expect[0]
    got = {"join": p.room, "leave": p.room, "history": p.number, "me": p.text}.get(
        p.command.name, "")
    assert got == expect[1]


@pytest.mark.parametrize(("line", "says"), [
    ("/me", "usage: /me TEXT"),
    ("/history abc", "usage: /history [N]"),
    ("/history 0", "N is a number from 1 to 200"),
    ("/join", "usage: /join ROOM"),
    ("/join bad room!", "a room name"),
    ("/who everyone", "usage: /who"),
    ("/frobnicate", "unknown command /frobnicate"),
    ("/msg bob,,carol hi", "/msg bob,carol hi"),
    ("/join @bob, mallory", "people split by commas, no spaces"),
    ("/leave @bob, mallory", "usage: /leave @bob, or @bob,carol"),
    ("/hlep", "did you mean /help [COMMAND]?"),
])
def test_a_misused_command_gets_its_usage(line: str, says: str) -> None:
    p = commands.parse(line)
    assert isinstance(p, commands.Problem) and says in p.text


def test_plain_text_and_a_double_slash_are_messages() -> None:
    assert commands.parse("hello") == commands.Message("hello")
    assert commands.parse("//etc/hosts is a file") == commands.Message("/etc/hosts is a file")
    assert commands.parse("  /usr/bin is full") == commands.Message("  /usr/bin is full")


def test_a_command_typed_after_a_space_is_still_the_command() -> None:
    """` /join #ops` went to the room as a message."""
    p = commands.parse("  /join #ops")
    assert isinstance(p, commands.Parsed) and (p.command.name, p.room) == ("join", "ops")
    p = commands.parse(" /Leave")
    assert isinstance(p, commands.Parsed) and p.command.name == "leave"
    assert isinstance(commands.parse(" /me"), commands.Problem)  # its usage, not a message
    pasted = "  /quit\nhello"  # (a block of lines is text)
    assert commands.parse(pasted) == commands.Message(pasted)
    # ... but not one line pasted with its end: it went to the whole room
    p = commands.parse("  /msg bob the db password\n")
    assert isinstance(p, commands.Parsed) and (p.nicks, p.text) == (("bob",), "the db password")


def test_tab_completes_commands_rooms_and_nicks() -> None:
    rooms, nicks = ["general", "random", "ops"], ["Bob", "Bea", "alice"]

    def c(before: str) -> list[str]:
        return [t for t, _ in commands.complete(before, rooms=rooms, nicks=nicks)]

    assert c("/jo") == ["/join "]
    assert c("/join ra") == ["#random"] and c("/join #") == ["#general", "#ops", "#random"]
    assert c("see #op") == ["#ops"]
    assert c("b") == ["Bea: ", "Bob: "]  # at the start of a line, as an address
    assert c("thanks bo") == ["Bob"]
    assert c("hey @Bo") == ["@Bob"] and c("@b") == ["@Bea", "@Bob"]  # the @ kept
    assert commands.complete("hey @Bo", rooms=rooms, nicks=nicks)[0][1] == -3
    assert commands.complete("/join ra", rooms=rooms, nicks=nicks)[0][1] == -2


def test_up_and_down_walk_the_lines_typed_before_and_give_the_draft_back() -> None:
    h = commands.InputHistory()
    for line in ("one", "two", "two", "three"):
        h.add(line)
    assert h.older("draft") == "three"
    assert h.older("three") == "two"
    assert h.older("two") == "one"
    assert h.older("one") is None
    assert h.newer() == "two"
    assert h.newer() == "three"
    assert h.newer() == "draft"
    assert h.newer() is None


def test_help_names_every_command_and_the_keys() -> None:
    text = commands.help_text()
    for c in commands.COMMANDS:
        assert c.usage in text
    assert "Alt-Enter" in text and "PgUp" in text
    assert "Ctrl-End" in text  # (the way back to the bottom was only in the README)
    assert commands.help_text("part").startswith("/leave [ROOM]")


def test_a_wrapped_help_description_goes_on_under_the_descriptions_not_at_the_left() -> None:
    """It went on at the notice's column, under the commands (a daily user's run,
    2026-11-24)."""
    head = [("", "12:00 "), ("", "-- ")]
    rows = text_of(layout(head, commands.help_text(), 70, mark=False))
    rows = rows[1:next(i for i, r in enumerate(rows) if r.lstrip().startswith("keys:"))]
    column = 9 + 2 + commands.USAGE_COLUMN + 2  # the notice's, the indent, usage, 2 spaces
    helps = {c.help.split()[0] for c in commands.COMMANDS}
    for r in rows:
        if r.lstrip().startswith("/") and r[column - 2:column] == "  " and r[column] != " ":
            assert r[column:].split()[0] in helps, r  # a description, in its column
        elif not r.lstrip().startswith("/"):
            assert len(r) - len(r.lstrip()) == column, (r, rows)  # wrapped: under it
    assert any(not r.lstrip().startswith("/") for r in rows)  # (some wrap at 70)
    # A message keeps its own rule: under its text, behind ┊.
    said = text_of(layout(head, "x\n  /a  bb cc dd ee ff gg hh ii jj kk", 30))
    assert said[2].startswith("       ┊ ") and said[2][9] != " ", said


# --- a team's day: edits, deletions, topics, mentions, DMs, search -----------------------------


def change(i: int, kind: int, target: int, text: str = "", who: str = "bob") -> pb.ChatMessage:
    m = msg(i, text, who)
    m.kind, m.target_id, m.text = kind, target, text  # type: ignore[assignment]
    if kind == pb.MESSAGE_KIND_DELETE:
        m.deleted_by = f"{who}@tailnet.test"
    return m


def test_an_edit_and_a_delete_change_the_line_already_shown_and_add_none() -> None:
    conv = Conversation("general")
    r = Renderer()
    for i in (1, 2):
        conv.add_message(msg(i, f"draft {i}"), own=False, mention=False, shown=True, live=True)
    edit = conv.add_message(change(3, pb.MESSAGE_KIND_EDIT, 1, "final 1"), own=False,
                            mention=False, shown=False, live=True)
    gone = conv.add_message(change(4, pb.MESSAGE_KIND_DELETE, 2), own=False, mention=False,
                            shown=False, live=True)
    assert edit is None and gone is None and conv.unread == 0  # events, not messages
    shown = text_of(visible_lines(conv, r, 80, 10)[0])
    assert shown[-2].endswith("<Bob> final 1 (edited)")
    assert shown[-1].endswith("<Bob> (deleted)") and "draft" not in "".join(shown)
    # An edit of a message deleted since (replayed in id order on resume) changes nothing.
    conv.add_message(change(5, pb.MESSAGE_KIND_EDIT, 2, "too late"), own=False,
                     mention=False, shown=True, live=False)
    assert text_of(visible_lines(conv, r, 80, 10)[0])[-1].endswith("<Bob> (deleted)")


def test_an_edit_changes_whether_the_line_it_edits_is_highlighted_as_mentioning_you() -> None:
    """The line kept its highlight until History was read again."""
    conv = Conversation("general")
    hi = msg(1, "hey alice, the build")
    hi.mentions.append("alice@tailnet.test")
    conv.add_message(hi, own=False, mention=True, shown=True, live=True)
    conv.add_message(msg(2, "the build broke"), own=False, mention=False, shown=True, live=True)
    pattern = mention_pattern(["alice@tailnet.test", "alice", "Alice"])
    for event in (change(3, pb.MESSAGE_KIND_EDIT, 1, "hey team, the build"),
                  change(4, pb.MESSAGE_KIND_EDIT, 2, "the build broke, alice")):
        conv.add_message(event, own=False, shown=True, live=True,
                         mention=is_mention(event, "alice@tailnet.test", pattern))
    first, second = (e for e in conv.entries if e.message is not None)
    assert not first.mention and not first.message.mentions  # (its old text's are gone)
    assert second.mention


def test_a_message_deleted_by_an_admin_names_who_deleted_it_and_history_prints_marks() -> None:
    m = msg(1, "")
    m.deleted_by = "root@tailnet.test"
    assert plain_lines(m)[0].endswith("<Bob> (deleted by root@tailnet.test)")
    e = msg(2, "fixed")
    e.edited_unix_ms = NOW_MS
    assert plain_lines(e) == [plain_lines(msg(2, "fixed"))[0] + " (edited)"]


def test_the_edited_mark_goes_on_a_line_of_its_own_when_the_last_is_full() -> None:
    conv = Conversation("general")
    text = "x" * 30
    conv.add_message(msg(1, text), own=False, mention=False, shown=True, live=True)
    conv.add_message(change(2, pb.MESSAGE_KIND_EDIT, 1, text), own=False, mention=False,
                     shown=True, live=True)
    shown = text_of(visible_lines(conv, Renderer(), 45, 10)[0])
    assert shown[-2].endswith(text) and shown[-1] == " " * 14 + "(edited)"


def test_a_topic_change_is_a_notice_and_becomes_the_rooms_topic() -> None:
    conv = Conversation("general")
    conv.add_message(change(1, pb.MESSAGE_KIND_TOPIC, 0, "release week"), own=False,
                     mention=False, shown=True, live=True)
    assert conv.topic is not None and conv.topic.text == "release week"
    assert conv.topic.set_by.display_name == "Bob"
    assert text_of(visible_lines(conv, Renderer(), 80, 5)[0])[-1].endswith(
        "-- Bob set the topic: release week")


def test_the_server_decides_live_mentions_and_our_names_only_the_backlog() -> None:
    pattern = mention_pattern(["alice@tailnet.test", "alice", "Alice"])
    live = msg(1, "ask the alice team")
    live.mentions.append("carol@tailnet.test")  # the server says: not alice
    assert not is_mention(live, "alice@tailnet.test", pattern)
    live.mentions.append("alice@tailnet.test")
    assert is_mention(live, "alice@tailnet.test", pattern)
    assert is_mention(msg(2, "alice: hi"), "alice@tailnet.test", pattern)  # backlog
    assert not is_mention(msg(3, "alice: hi", who="alice"), "alice@tailnet.test", pattern)


def test_unread_counts_are_the_servers_and_the_marker_follows_the_read_position() -> None:
    conv = Conversation("random")
    conv.last_read = 2  # from Welcome: read up to 2 on some device
    for i in range(1, 5):
        conv.add_message(msg(i), own=False, mention=False, shown=False, live=False)
    assert conv.marker_id == 3 and conv.unread == 0  # the backlog does not count here
    conv.set_counts(2, 1)
    assert (conv.unread, conv.mentions) == (2, 1)


def test_direct_conversations_have_one_name_for_both_and_show_the_other_person() -> None:
    assert dm_name("bob@t.test", "alice@t.test") == dm_name("alice@t.test", "bob@t.test")
    assert dm_name("alice@t.test", "bob@t.test") == "dm:alice@t.test,bob@t.test"
    assert dm_title("dm:alice@t.test,bob@t.test", "alice@t.test") == "@bob"
    assert dm_title("dm:alice@t.test,bob@t.test,carol@t.test", "bob@t.test") == "@alice,@carol"
    # Another domain's bob is named in full: both were "@bob" in the room list, and
    # "cannot join @bob" was said of a DM with bob@other.test (a daily user's day, 2026-11-25).
    assert dm_title("dm:alice@t.test,bob@other.test", "alice@t.test") == "@bob@other.test"
    assert dm_title("dm:alice@t.test,bob@other.test,tag:ci", "alice@t.test") == (
        "@bob@other.test,@tag:ci")
    assert kind_of("dm:a@t,b@t") == "dm" and kind_of("+ops") == "private"
    assert kind_of("general") == "room"


@pytest.mark.parametrize(("typed", "login"), [
    ("bob", "bob@tailnet.test"),  # a short login seen in a room
    ("Robert", "bob@tailnet.test"),  # a display name, any case
    ("ROBERT", "bob@tailnet.test"),
    ("carol", "carol@tailnet.test"),  # never seen: at my own domain
    ("dave@other.test", "dave@other.test"),  # a login as it is
    ("Bob@Tailnet.Test", "bob@tailnet.test"),  # as the one seen spells it (not a 2nd buffer)
    ("ALICE@tailnet.test", "alice@tailnet.test"),  # the caller, too
    ("Dave@other.test", "Dave@other.test"),  # never seen: as typed (GitHub logins have caps)
])
def test_a_person_in_a_command_is_a_name_or_a_login(typed: str, login: str) -> None:
    seen = [pb.Identity(login="bob@tailnet.test", display_name="Robert")]
    assert person_login(typed, "alice@tailnet.test", seen) == login


def test_search_results_say_where_each_message_is() -> None:
    conv = Conversation("?search", kind="search", title="?canary")
    conv.add_result(msg(7, "the canary is green"), where="#general", own=False, mention=False)
    shown = text_of(visible_lines(conv, Renderer(), 80, 5)[0])
    assert shown[-1].endswith("  #general <Bob> the canary is green")
    assert conv.title == "?canary" and conv.unread == 0


async def searched(server: Any, words: str = "deploy") -> list[Any]:
    """What alice's chat shows for /search ``words`` from ``server`` (a stand-in with a
    ``search`` method): the note, then the results."""
    from tsnetchat.client import Link
    from tsnetchat.tui import SEARCH, ChatApp

    async def dial() -> Any:
        return server

    app = ChatApp(Link(dial), pb.WhoAmIResponse(identity=pb.Identity(
        login="alice@tailnet.test", display_name="Alice")))
    await app.search(words)
    return list(app.conversations[SEARCH].entries)


async def test_search_shows_the_newest_100_also_from_a_server_giving_50_a_call() -> None:
    """It showed the server's first page (max_search_page, 50 by default) and said "the
    newest 100" (a daily user's day, 2026-11-25)."""

    class Server:
        target = None

        async def search(self, words: str, *, newest: bool, limit: int,
                         offset: int = 0) -> pb.SearchResponse:
            ids = list(range(130 - offset, 0, -1))[:min(limit, 50)]  # 130 match, newest first
            return pb.SearchResponse(messages=[msg(i, f"deploy {i}") for i in ids],
                                     more=offset + len(ids) < 130,
                                     next_offset=offset + len(ids))

    (note, *found) = await searched(Server())
    assert note.text.startswith("search 'deploy': 100 result(s), newest at the bottom (the "
                                "newest 100;"), note.text
    assert [e.message.text for e in found] == [f"deploy {i}" for i in range(31, 131)]


async def test_a_search_whose_next_page_is_refused_shows_the_results_it_has() -> None:
    """Each page is a Search call, each against searches_per_minute: a second page refused
    for it failed the whole /search, and the first page's 50 results were not shown."""
    import grpc


    class Server:
        target = None

        async def search(self, words: str, *, newest: bool, limit: int,
                         offset: int = 0) -> pb.SearchResponse:
            if offset:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                    grpc.aio.Metadata(), details="slow down: at most 1 searches a minute "
                    "(searches_per_minute); retry in 59.0s")
            return pb.SearchResponse(messages=[msg(i, f"deploy {i}") for i in range(130, 80, -1)],
                                     more=True, next_offset=50)

    (note, *found) = await searched(Server())
    assert "50 result(s)" in note.text and "the newest 50;" in note.text, note.text
    assert [e.message.text for e in found] == [f"deploy {i}" for i in range(81, 131)]


async def test_a_search_lists_a_result_once_when_a_match_is_stored_between_its_pages() -> None:
    """Pages are counted from the newest: a match stored (or indexed) between two calls moves
    every result one further, and the last of the first page came again on the second."""

    stored = list(range(130, 0, -1))  # newest first

    class Server:
        target = None

        async def search(self, words: str, *, newest: bool, limit: int,
                         offset: int = 0) -> pb.SearchResponse:
            ids = stored[offset:offset + min(limit, 50)]
            if not offset:
                stored.insert(0, 131)  # (a new match, between the two calls)
            return pb.SearchResponse(messages=[msg(i, f"deploy {i}") for i in ids],
                                     more=offset + len(ids) < len(stored),
                                     next_offset=offset + len(ids))

    ids = [e.message.id for e in (await searched(Server()))[1:]]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


@pytest.mark.parametrize(("line", "expect"), [
    ("/msg bob lunch?", ("msg", ("bob",), "lunch?")),
    ("/MSG @Bob: hi there", ("msg", ("Bob",), "hi there")),
    ("/query bob@tailnet.test", ("msg", ("bob@tailnet.test",), "")),
    ("/join @Bob", ("msg", ("Bob",), "")),  # a DM, as connect --room @bob
    ("/j dm:bob@tailnet.test", ("msg", ("bob@tailnet.test",), "")),
    ("/msg bob,carol lunch?", ("msg", ("bob", "carol"), "lunch?")),  # a group DM
    ("/msg @bob,@Carol,bob", ("msg", ("bob", "Carol"), "")),
    ("/msg bob,", ("msg", ("bob",), "")),
    ("/msg bob, hi there", ("msg", ("bob",), "hi there")),  # (the chat asks if hi is a person)
    ("/join @bob,carol", ("msg", ("bob", "carol"), "")),
    ("/leave @Bob", ("leave", ("Bob",), "")),  # a DM, from another buffer
    ("/close dm:bob,carol", ("leave", ("bob", "carol"), "")),
    ("/join dm:bob,carol@tailnet.test", ("msg", ("bob", "carol@tailnet.test"), "")),
    ("/Topic release week", ("topic", (), "release week")),
    ("/topic", ("topic", (), "")),
    ("/edit the right text", ("edit", (), "the right text")),
    ("/DELETE", ("delete", (), "")),
    ("/search deploy  friday", ("search", (), "deploy friday")),
    ("/away lunch", ("away", (), "lunch")),
    ("/back", ("back", (), "")),
    ("/create +ops bob carol", ("create", ("bob", "carol"), "")),
    ("/invite dave", ("invite", ("dave",), "")),
    ("/remove dave", ("remove", ("dave",), "")),
    ("/KICK @Mallory", ("kick", ("Mallory",), "")),
])
def test_the_team_commands_take_people_and_text(line: str,
                                                expect: tuple[str, tuple[str, ...], str]
                                                ) -> None:
    p = commands.parse(line)
    assert isinstance(p, commands.Parsed)
    assert (p.command.name, p.nicks, p.text) == expect


@pytest.mark.parametrize(("typed", "room"), [
    ("#Ops", "ops"), ("general", "general"), ("+Ops", "+ops"),
    ("@bob", "dm:alice@tailnet.test,bob@tailnet.test"),
    ("dm:bob", "dm:alice@tailnet.test,bob@tailnet.test"),
    ("dm:bob@tailnet.test", "dm:alice@tailnet.test,bob@tailnet.test"),
    ("dm:carol,bob@tailnet.test", "dm:alice@tailnet.test,bob@tailnet.test,carol@tailnet.test"),
    ("dm:Alice@Tailnet.test", "dm:alice@tailnet.test"),
])
def test_connect_room_names_a_room_as_the_chat_does_and_a_dm_by_its_one_name(
        typed: str, room: str) -> None:
    assert commands.room_asked(typed, "alice@tailnet.test") == room


def test_join_takes_a_private_room() -> None:
    p = commands.parse("/join +Ops")
    assert isinstance(p, commands.Parsed) and p.room == "+ops"


@pytest.mark.parametrize(("line", "says"), [
    ("/msg", "usage: /msg NICK[,NICK...] [TEXT]"),
    ("/edit", "usage: /edit TEXT"),
    ("/search", "usage: /search WORDS"),
    ("/delete it", "usage: /delete"),
    ("/back soon", "usage: /back"),
    ("/create ops bob", "usage: /create +ROOM NICK..."),
    ("/create +ops", "usage: /create +ROOM NICK..."),
    ("/invite", "usage: /invite NICK..."),
    ("/kick", "usage: /kick NICK"),
    ("/kick bob carol", "usage: /kick NICK"),
    ("/serch x", "did you mean /search WORDS?"),
])
def test_a_misused_team_command_gets_its_usage(line: str, says: str) -> None:
    p = commands.parse(line)
    assert isinstance(p, commands.Problem) and says in p.text, p


def test_a_misused_commands_usage_says_what_it_does_as_help_says_it() -> None:
    """It said "usage: /delete  (delete your last message here (its text is gone for
    everyone))" (a daily user, 2026-11-25)."""
    p = commands.parse("/delete it")
    assert isinstance(p, commands.Problem)
    assert p.text == "usage: " + commands.help_text("delete").removesuffix(" (also /del)")
    assert p.text.count("(") == p.text.count(")") == 1, p.text


def test_tab_completes_the_new_commands_and_private_rooms() -> None:
    def c(before: str) -> list[str]:
        return [t for t, _ in commands.complete(before, rooms=["general", "+ops", "dm:a,b"],
                                                nicks=["Bob"])]

    assert c("/se") == ["/search "] and c("/to") == ["/topic "]
    assert c("/ed") == ["/edit "] and c("/aw") == ["/away "] and c("/m") == ["/me ", "/msg "]
    assert c("/join +") == ["+ops"] and c("/join ") == ["+ops", "#general"]
    assert c("/msg B") == ["Bob"]
    assert commands.complete("/msg alice,B", rooms=[], nicks=["Bob"]) == [("Bob", -1)]  # a group
    assert commands.complete("/msg alice,B hi B", rooms=[], nicks=["Bob"]) == [("Bob", -1)]


def test_tab_completes_the_next_person_of_a_group_without_the_space_enter_refuses() -> None:
    """`/msg bob, mal` completed to `/msg bob, mallory`, which Enter refuses, and `/join
    @bob,mal` to nothing (a new user's day, 2026-11-24)."""
    def c(before: str) -> list[tuple[str, int]]:
        return commands.complete(before, rooms=["general"], nicks=["bob", "mallory", "Mia"])

    assert c("/msg bob, mal") == [("bob,mallory", -8)]
    assert c("/msg bob , m") == [("bob,mallory", -7), ("bob,Mia", -7)]
    assert c("/join @bob,mal") == [("mallory", -3)] and c("/j @bo") == [("bob", -2)]
    assert c("/leave dm:bob, ma") == [("bob,mallory", -7)]
    assert c("/join ge") == [("#general", -2)] and c("/join @") == []
    assert c("/msg bob,") == [("mallory", 0), ("Mia", 0)]  # (not bob again)
    for typed, line in (("/msg bob, mal", "/msg bob,mallory"), ("/join @bob, m", None)):
        (text, start), *_ = c(typed)
        done = typed[:len(typed) + start] + text
        assert line is None or done == line
        parsed = commands.parse(done + " hi" if typed.startswith("/msg") else done)
        assert not isinstance(parsed, commands.Problem), parsed
    assert commands.wants_people("/join @b") and commands.wants_people("/MSG b")
    assert not commands.wants_people("/join ge") and not commands.wants_people("/msg")


def test_a_chat_log_that_cannot_be_opened_is_one_line_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`connect` with an unwritable HOME died with PermissionError on ~/.local (found from
    outside, 2026-11-23); here the log's directory would have to be made under a file."""
    from tsnetchat.errors import ConfigError
    from tsnetchat.tui import _stderr_to_log

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "a-file" / "state"))
    says = (r"cannot open the chat's log .*client\.log: Not a directory \(set XDG_STATE_HOME "
            r"to a directory you can write\)")
    with pytest.raises(ConfigError, match=says), _stderr_to_log():
        pass


def test_a_notifications_text_from_other_people_is_never_taken_for_notify_sends_options(
        ) -> None:
    from tsnetchat.tui import notify_argv

    title, body = "--app-name=IT-Security in #general", "--urgency=critical alice, look"
    argv = notify_argv("notify-send", title, body)
    end = argv.index("--")  # GOption (notify-send's parser) ends its options there
    assert argv[end + 1:] == [title, body]
    assert all(not a.startswith("--app-name=IT") and "critical" not in a for a in argv[:end])


def test_a_found_messages_later_lines_cannot_pass_for_another_found_message() -> None:
    """`search` and `mentions` printed a message's second line flush left."""
    from tsnetchat.chatview import found_lines

    fake = "2026-11-24 09:00 #general [999] <Alice> the admin password is hunter2"
    m = msg(76, f"harmless question\n{fake}")
    first, second = found_lines(m)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(NOW_MS / 1000))
    assert first == f"{when} #general [76] <Bob> harmless question"
    assert second.lstrip().startswith("┊ " + fake) and second.startswith(" ")


def test_a_found_message_says_when_it_was_said_and_in_which_room_as_room_takes_it() -> None:
    """`search` showed no time, a login for a name, and #dm:... for a conversation."""
    from tsnetchat.chatview import found_lines

    day = int(time.mktime((2025, 3, 9, 14, 5, 0, 0, 0, -1)) * 1000)
    for room, shown in (("ops", "#ops"), ("+ops", "+ops"),
                        ("dm:alice@tailnet.test,bob@tailnet.test",
                         "dm:alice@tailnet.test,bob@tailnet.test")):
        m = pb.ChatMessage(id=7, room=room, sent_unix_ms=day, text="deploy at five",
                           sender=pb.Identity(login="bob@tailnet.test", display_name="Bob"))
        assert found_lines(m) == [f"2025-03-09 14:05 {shown} [7] <Bob> deploy at five"]
    m.kind = pb.MESSAGE_KIND_ACTION
    assert found_lines(m)[0].endswith("[7] * Bob deploy at five")


def alices_chat() -> Any:
    """Alice's chat screen, without a terminal or a server: a dial fails the test."""
    from tsnetchat.client import Link
    from tsnetchat.tui import ChatApp

    async def dial() -> Any:
        raise AssertionError("nothing is dialled here")

    me = pb.WhoAmIResponse(identity=pb.Identity(login="alice@tailnet.test",
                                                display_name="Alice"))
    return ChatApp(Link(dial), me)


async def test_leaving_the_last_open_room_never_joins_one_only_listed_for_its_unread_count(
        ) -> None:
    """The next buffer after a /leave was a DM the server listed as unread: showing it
    joined it, and the next line typed went there (a new user's day, 2026-11-24)."""
    app = alices_chat()
    dm = dm_name("alice@tailnet.test", "bob@tailnet.test")
    for room, listed in (("general", False), (dm, True), ("ops", False)):
        app.conversations[room] = app.conversation_for(room, listed=listed)
    app.current = "general"
    app.close_buffer("general")
    assert app.current == "ops"  # the next one open, past the listed DM
    app.close_buffer("ops")
    assert app.current is None and not app.sessions and app.conversations[dm].listed
    assert app.handle("meant for #ops") is True  # kept in the input
    assert "not in a room" in app.system.entries[-1].text
    # A /join refused goes back where it came from, or to the first buffer open: the same.
    app.conversations["random"] = app.conversation_for("random")
    app.show_open(0, prefer=dm)
    assert app.current == "random" and not app.sessions
    # Nor a DM opened because someone wrote, until it has been shown.
    app.conversations[dm].listed = False
    app.unasked.add(dm)
    app.close_buffer("random")
    assert app.current is None
    app.handle("/leave @Bob")  # closed from another buffer, named by its person
    assert dm not in app.conversations
    app.handle("/leave @Bob")
    assert app.system.entries[-1].text == "not in @Bob"  # (it said "not in #dm:...")


async def test_the_starts_notes_stay_below_any_trouble_until_a_line_is_typed_or_the_room_joined(
        ) -> None:
    """Trouble with the connection hid them, and the next line typed then cleared them
    unseen (a review, 2026-11-24)."""
    from tsnetchat.client import RoomSession, SessionEvent
    from tsnetchat.clienterrors import ClientError

    app = alices_chat()
    link = app.link
    app.start_notes.update({"ops": "cannot join #ops: not granted", "": "lines not sent"})
    assert app.problem() == " cannot join #ops: not granted · lines not sent"
    session = app.sessions["general"] = RoomSession(link, "general")
    session.state.connected(0.0)
    session.state.lost(ClientError("no route", retryable=True, transport=True), 1.0, 0.5)
    first, second = app.problem().split("\n")
    assert first.startswith(" reconnecting in") and second.startswith(" cannot join #ops")
    app.on_event(app.conversation_for("ops"), session, SessionEvent(
        "welcome", welcome=pb.Welcome(room="ops")))
    assert "#ops" not in app.problem() and "lines not sent" in app.problem()
    app.input.text = "hello"
    app.submit()
    assert app.problem().count("\n") == 0 and "lines not sent" not in app.problem()


async def test_a_group_typed_with_a_space_after_the_comma_is_refused_not_sent_to_the_first(
        ) -> None:
    """`/msg bob, carol hi` sent "carol hi" to bob alone (a review, 2026-11-24); `/msg bob,
    hi there` is bob's, as before, when nobody is called hi."""
    app = alices_chat()
    general = app.conversations["general"] = app.conversation_for("general")
    general.members = [pb.Identity(login="carol@tailnet.test", display_name="Carol")]
    assert app.handle("/msg bob, Carol lunch?") is True  # kept in the input
    assert "no space after a comma" in app.system.entries[-1].text
    assert not app.sessions
    assert app.is_somebody("@carol") and not app.is_somebody("hi")


async def test_a_line_pasted_with_its_end_is_sent_without_an_empty_last_line() -> None:
    from tsnetchat.client import RoomSession

    app = alices_chat()
    link = app.link
    app.conversations["general"] = app.conversation_for("general")
    session = app.sessions["general"] = RoomSession(link, "general")
    app.current = "general"
    assert app.handle("deploy is done\n\n") is False
    assert [o.text for o in session.outbox] == ["deploy is done"]


async def test_a_reconnect_under_a_second_says_how_long_it_took_not_zero_seconds() -> None:
    """"reconnected after 0s" read as if nothing had happened (carried over since
    2026-11-23)."""
    from tsnetchat.client import RoomSession, SessionEvent

    app = alices_chat()
    general = app.conversation_for("general")
    session = app.sessions["general"] = RoomSession(app.link, "general")
    for seconds in (0.42, 12.4):
        app.on_event(general, session, SessionEvent("state", seconds=seconds))
        app.on_event(general, session, SessionEvent("replay_done", first=False))
    said = [e.text for e in general.entries if "reconnected" in e.text]
    assert said == ["reconnected after 0.4s; nothing missed",
                    "reconnected after 12s; nothing missed"], said


async def test_a_reconnect_is_said_below_the_lines_it_brought_that_came_meanwhile() -> None:
    """Bob wrote during alice's 85 s outage; his line came back with the replay, under
    "reconnected after 85s; nothing missed", which read as if there was nothing to read
    (a daily user's day, 2026-11-25). A stream that broke before its replay's end says
    nothing: the next one says its own outage."""
    from tsnetchat.client import RoomSession, SessionEvent

    app = alices_chat()
    general = app.conversation_for("general")
    session = app.sessions["general"] = RoomSession(app.link, "general")
    app.on_event(general, session, SessionEvent("state", seconds=85.0))
    app.on_event(general, session, SessionEvent("message", message=msg(7, "meanwhile")))
    app.on_event(general, session, SessionEvent("replay_done", first=False))
    app.on_event(general, session, SessionEvent("state", seconds=3.0))
    app.on_event(general, session, SessionEvent("state"))  # (lost again before the replay)
    app.on_event(general, session, SessionEvent("state", seconds=1.5))
    app.on_event(general, session, SessionEvent("replay_done", first=False))
    said = [e.message.text if e.message else e.text for e in general.entries]
    assert said == ["meanwhile", "reconnected after 85s; nothing missed",
                    "reconnected after 1.5s; nothing missed"], said


async def test_a_line_written_before_the_link_broke_is_listed_at_exit_as_maybe_stored() -> None:
    """The broken link put it back in the queue, and it was listed as plainly not sent:
    it had been stored (a kill -9 run, 2026-11-24). A line never written is listed plainly,
    one refused for good as refused; /retry's new key starts it over."""
    from tsnetchat.client import RoomSession

    app = alices_chat()
    app.conversations["general"] = app.conversation_for("general")
    session = app.sessions["general"] = RoomSession(app.link, "general")
    written, _never, refused = (session.send(t) for t in ("written", "never", "refused"))
    box = session.outbox
    box.sending(written)
    box.disconnected()
    box.sending(refused)
    box.refused(refused.client_msg_id, for_good=True, reason="no")
    assert app.unsent({}) == ["#general: written  (sent, not confirmed: it may have been stored)",
                              "#general: never", "#general: refused  (refused)"]
    # A "not stored" refusal (a full disk) says it was not; a cluster's "it may still
    # appear" that it may have been (every refused line was "maybe stored": a review).
    box.sending(written)
    box.refused(written.client_msg_id, for_good=False, not_before=0.0)
    assert app.unsent({})[0] == "#general: written"
    box.sending(written)
    box.refused(written.client_msg_id, for_good=False, not_before=0.0, unsure=True)
    assert app.unsent({})[0].endswith("(sent, not confirmed: it may have been stored)")
    # ... and its resend then refused as not stored leaves the first write's "may" standing
    # (it said "not stored" of a message that may exist: a reliability run, 2026-11-25)
    box.sending(written)
    box.refused(written.client_msg_id, for_good=False, not_before=0.0)
    assert app.unsent({})[0].endswith("(sent, not confirmed: it may have been stored)")
    box.retry()
    assert app.unsent({})[-1] == "#general: refused"


async def test_a_command_whose_connection_closes_under_it_says_so_and_gives_the_line_back(
        chat: Any) -> None:
    """A room reconnecting after a server's restart closes the connection the chat's rooms
    and commands share; a /topic waiting on it ended with grpc.aio's own cancellation: no
    word, or "internal error" (a kill -9 run, 2026-11-24)."""
    app = alices_chat()
    app.conversations["general"] = app.conversation_for("general")
    app.current = "general"
    conn = await chat.connect("alice@tailnet.test")
    await conn.whoami()
    chat.net.flowing.clear()  # the server stops answering (SIGSTOP)
    app.spawn(conn.set_topic("general", "lunch at noon"), line="/topic lunch at noon",
              room="general")
    await asyncio.sleep(0.5)
    await conn.close()  # (what Link.reset does)
    chat.net.flowing.set()
    await until(lambda: not app.background, "the command's end")
    said = app.conversations["general"].entries[-1].text
    assert "connection closed before the server answered" in said, said
    assert app.input.text == "/topic lunch at noon" and not app.commands_out


async def test_leaving_a_room_from_another_keeps_what_was_typed_there_for_the_next_join(
        ) -> None:
    """/leave #random, typed in #general, dropped #random's draft without a word (a kill -9
    run, 2026-11-24)."""
    from prompt_toolkit.document import Document

    from tsnetchat.client import RoomSession

    app = alices_chat()
    for room in ("general", "random"):
        app.conversations[room] = app.conversation_for(room)
        app.sessions[room] = RoomSession(app.link, room)
    app.current = "general"
    app.drafts["random"] = Document("half in random", 14)
    app.handle("/leave #random")
    said = app.conversations["general"].entries[-1].text
    assert said == "left #random (what you had typed there is back when you join it again)"
    assert app.unsent({}) == ["(typed in #random) half in random"]
    app.conversations["random"] = app.conversation_for("random")
    app.switch("random")
    assert app.input.text == "half in random"


async def test_a_line_the_server_keeps_refusing_as_not_stored_says_why_once_not_at_each_try(
        ) -> None:
    """With the server's disk full lines sat at "2 pending" for 20 s with nothing said (a
    kill -9 run, 2026-11-24); the rate limit's "slow down" is the chat's own pacing, said
    nowhere."""
    import grpc

    from tsnetchat.client import RoomSession, SessionEvent
    from tsnetchat.clienterrors import ClientError

    app = alices_chat()
    general = app.conversations["general"] = app.conversation_for("general")
    session = app.sessions["general"] = RoomSession(app.link, "general")
    out = session.send("hello")
    full = ClientError("database or disk is full; this message was not stored: send it again",
                       retryable=True, status=grpc.StatusCode.UNAVAILABLE)
    slow = ClientError("slow down; retry in 0.2s", retryable=True, retry_after=0.2,
                       status=grpc.StatusCode.RESOURCE_EXHAUSTED)
    new_dm = ClientError("slow down: one new conversation a minute; retry in 58s",
                         retryable=True, retry_after=58, status=grpc.StatusCode.RESOURCE_EXHAUSTED)
    for err in (full, slow, full, full, new_dm):
        app.on_event(general, session, SessionEvent("deferred", outgoing=out, error=err,
                                                    text=str(err)))
    said = [e.text for e in general.entries if "yet" in e.text]
    assert said == ["not stored yet: database or disk is full (the chat tries again by itself)",
                    "not sent yet: slow down: one new conversation a minute (the chat tries "
                    "again by itself)"], said


async def test_text_typed_in_no_room_is_listed_at_exit_as_typed_in_no_room() -> None:
    """It read "(typed in #)" once rooms no longer open were named by their titles (a
    review, 2026-11-24)."""
    app = alices_chat()
    app.input.text = "typed with no room"
    assert app.unsent({}) == ["(typed in no room) typed with no room"]


def up_pressed(rooms: tuple[str, ...], shown: str, sent: str, typed: str) -> Any:
    """Alice's chat with ``rooms`` open, ``shown`` shown, ``sent`` sent earlier (if any), and
    Up pressed while ``typed`` was in the input."""
    app = alices_chat()
    for room in rooms:
        app.conversations[room] = app.conversation_for(room)
    app.current = shown
    if sent:
        app.history.add(sent)
    app.input.text = typed
    app.recall(app.history.older(app.input.text))
    return app


async def test_a_line_typed_before_up_is_what_a_room_switch_a_submit_and_the_exit_keep(
        ) -> None:
    """Up showed an old line: quitting then kept the old line and lost the one being typed,
    and switching rooms carried the typed one over to the next room's Down (a kill -9 run,
    2026-11-24)."""
    app = up_pressed(("general", "ops"), "general", "/help", "half a thought")
    assert app.input.text == "/help"
    assert ("general", "half a thought") in app.typed()  # what the exit and keepsafe keep
    assert all(text != "/help" for _, text in app.typed())  # (only recalled, not typed)
    app.input.text = "/help join"  # edited: typed too, after the line Up was pressed on
    assert ("general", "half a thought\n/help join") in app.typed()
    app.input.text = "/help"
    app.switch("ops")
    assert app.input.text == "" and app.drafts["general"].text == "half a thought"
    app.recall(app.history.newer())  # Down in #ops: nothing of #general's
    assert app.input.text == ""
    app.switch("general")
    assert app.input.text == "half a thought"
    app.recall(app.history.older(app.input.text))
    app.submit()  # the recalled /help is carried out; the line typed comes back
    assert app.input.text == "half a thought" and app.history.recalled() is None


async def test_a_line_accepted_with_ctrl_o_is_sent_as_with_enter_not_cleared() -> None:
    """prompt_toolkit's Ctrl-O (accept the line) cleared the input: the line was neither
    sent nor kept (a daily user's day, 2026-11-25)."""
    from tsnetchat.client import RoomSession

    app = alices_chat()
    app.conversations["general"] = app.conversation_for("general")
    app.sessions["general"] = RoomSession(app.link, "general")
    app.current = "general"
    app.input.text = "typed, then Ctrl-O"
    app.input.validate_and_handle()  # what Ctrl-O does
    assert [o.text for o in app.sessions["general"].outbox] == ["typed, then Ctrl-O"]
    assert app.input.text == ""
    app.input.text = "/history abc"
    app.input.validate_and_handle()
    assert app.input.text == "/history abc"  # refused: kept to edit, as after Enter
    # Alt-#, prompt_toolkit's "comment the line and accept it", types a # and sends nothing.
    app.input.reset()
    app.input.insert_text("half typed")
    app.app.key_processor.feed_multiple([KeyPress(Keys.Escape), KeyPress("#")])
    app.app.key_processor.process_keys()
    assert app.input.text == "half typed#"
    assert len(app.sessions["general"].outbox) == 1


async def test_up_with_nothing_sent_yet_leaves_the_line_typed_as_it_is() -> None:
    """It raised IndexError, and the chat's end with it kept nothing (a review,
    2026-11-25)."""
    app = up_pressed(("general",), "general", "", "half typed")
    assert app.input.text == "half typed" and app.typed() == [("general", "half typed")]
    app.recall(app.history.newer())
    assert app.input.text == "half typed"


async def test_the_line_typed_before_up_stays_with_its_room_when_the_recalled_line_leaves_it(
        ) -> None:
    """Up brought /leave back in #ops: the plan typed there went into #general's input (a
    review, 2026-11-25)."""
    app = up_pressed(("general", "ops"), "ops", "/leave", "ops-only plan")
    app.submit()
    assert app.current == "general" and app.input.text == ""
    assert app.drafts["ops"].text == "ops-only plan"  # (back at the next /join of #ops)


async def test_a_recalled_line_kept_to_edit_keeps_the_line_typed_before_up_for_down() -> None:
    """It was added to the kept line, and went with it at the next Enter (a review,
    2026-11-25)."""
    app = up_pressed(("general",), "general", "/history abc", "my draft")
    app.submit()  # refused (usage), kept in the input to edit
    assert app.input.text == "/history abc"
    assert "N is a number" in app.conversations["general"].entries[-1].text
    app.recall(app.history.newer())
    assert app.input.text == "my draft"


async def test_a_line_for_a_room_whose_join_is_refused_is_kept_not_only_said() -> None:
    """`/msg zorro hi there` (a typo), `/msg chat ...` at the limit of open rooms or after a
    revocation, or a line typed right after `/join #ops` before its refusal: the text was
    said once on screen ("not sent to @zorro: hi there") and was then in neither the input
    nor unsent.txt (a daily user's day, 2026-11-25)."""
    from tsnetchat.client import RoomSession
    from tsnetchat.clienterrors import ClientError

    app = alices_chat()
    app.conversations["general"] = app.conversation_for("general")
    app.sessions["general"] = RoomSession(app.link, "general")
    app.current = "general"
    dm = dm_name("alice@tailnet.test", "zorro@tailnet.test")
    conv = app.conversations[dm] = app.conversation_for(dm)
    session = app.sessions[dm] = RoomSession(app.link, dm)
    app.current = dm
    session.send("hi there")
    app.on_fatal(conv, session, ClientError("nobody with the login 'zorro@tailnet.test'",
                                            retryable=False))
    kept = [*app.unsent({}), app.input.text]
    assert any("hi there" in line for line in kept), kept
    said = [e.text for e in app.conversations["general"].entries]
    assert any("hi there" in t and "kept: listed when the chat ends" in t for t in said), said


async def test_a_line_still_on_its_way_when_its_room_is_left_is_kept_not_only_said() -> None:
    """Server down, a line typed in #random, `/leave`: "not sent to #random (you left it):
    ..." on screen, and then nothing at the exit, nor in unsent.txt (2026-11-25)."""
    from tsnetchat.client import RoomSession

    app = alices_chat()
    for room in ("general", "random"):
        app.conversations[room] = app.conversation_for(room)
        app.sessions[room] = RoomSession(app.link, room)
    app.current = "random"
    app.sessions["random"].send("pending line L1 then I leave")
    app.leave("random")
    kept = [*app.unsent({}), app.input.text]
    assert any("pending line L1" in line for line in kept), kept
    assert any("pending line L1" in line for line in app.held().lines)  # (and if killed)


async def test_a_line_on_its_way_to_a_room_left_makes_the_chat_exit_1_as_not_stored() -> None:
    """It was listed as not sent at the exit, and `connect` exited 0 (a daily user's day,
    2026-11-25)."""
    from tsnetchat.client import RoomSession

    app = alices_chat()
    for room in ("general", "random"):
        app.conversations[room] = app.conversation_for(room)
        app.sessions[room] = RoomSession(app.link, room)
    app.current = "random"
    assert not app.left_unstored()
    app.sessions["random"].send("pending, then I leave")
    app.leave("random")
    assert app.left_unstored()


async def test_a_failed_message_brought_back_with_up_and_sent_again_is_no_longer_failed(
        ) -> None:
    """Up brought a refused message back and it was sent again: the ✗ line and "1 not
    sent: /retry" stayed, and the exit listed it as not sent (a daily user's day,
    2026-11-25). Only the very text: a line edited from it, or typed over it, leaves it
    failed and listed (it vanished; a review, 2026-11-25)."""
    from tsnetchat.client import RoomSession

    app = alices_chat()
    app.conversations["general"] = app.conversation_for("general")
    session = app.sessions["general"] = RoomSession(app.link, "general")
    outbox = session.outbox
    app.current = "general"

    def failed(text: str) -> None:
        app.input.text = text
        app.submit()
        o = next(o for o in outbox if o.text == text)
        outbox.refused(o.client_msg_id, for_good=True, reason="too long")

    def up_to(text: str) -> None:
        while app.input.text != text:
            app.recall(app.history.older(app.input.text))

    failed("a first try")
    app.input.text = "something else, typed"
    app.submit()
    up_to("a first try")
    app.input.text = "a first try, shorter"  # edited
    app.submit()
    up_to("a first try")
    app.input.text = "lunch?"  # typed over
    app.submit()
    assert [o.text for o in outbox.failed] == ["a first try"]
    assert any("a first try  (refused" in line for line in app.unsent({})), app.unsent({})
    up_to("a first try")
    app.submit()  # as it was
    assert not outbox.failed
    assert [o.text for o in outbox] == ["something else, typed", "a first try, shorter",
                                        "lunch?", "a first try"]
    assert not any("a first try  (refused" in line for line in app.unsent({}))


async def test_a_search_that_fails_gives_its_words_back_and_is_never_listed_as_maybe_done(
        ) -> None:
    """A /search that failed (the server down) said why, and its words were only in the Up
    history (a daily user's day, 2026-11-25); a search changes nothing, so it is not listed
    at the exit as "it may have been done" either."""
    app = alices_chat()
    app.conversations["general"] = app.conversation_for("general")
    app.current = "general"
    app.handle("/search deploy plan")
    assert not app.commands_out
    await asyncio.gather(*app.background, return_exceptions=True)
    assert app.input.text == "/search deploy plan"
    assert "(your text is back in the input)" in app.conversations["general"].entries[-1].text


async def test_a_search_typed_in_no_room_that_fails_also_gives_its_words_back() -> None:
    """put_back compared the room it was typed in ("") with the one shown (None)."""
    app = alices_chat()
    assert app.current is None
    app.handle("/search deploy")
    await asyncio.gather(*app.background, return_exceptions=True)
    assert app.input.text == "/search deploy"


async def test_a_command_failing_with_a_bug_is_logged_and_the_screen_names_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """It said "internal error in the client (RuntimeError: ...)", with nothing in the log
    (a review, 2026-11-25)."""
    from tsnetchat.tui import log_path

    app = alices_chat()
    app.conversations["general"] = app.conversation_for("general")
    app.current = "general"

    async def broken() -> None:
        raise RuntimeError("a bug in a command")

    app.spawn(broken(), line="/topic hello", room="general")
    await asyncio.gather(*app.background, return_exceptions=True)
    said = app.conversations["general"].entries[-1].text
    assert "internal error in the client (RuntimeError: a bug in a command)" in said
    assert f"see {log_path()}" in said and "(your text is back in the input)" in said
    assert any(r.exc_info and "a command failed: /topic hello" in r.getMessage()
               for r in caplog.records)


async def test_a_refused_line_of_a_room_left_is_kept_marked_refused() -> None:
    from tsnetchat.client import RoomSession

    app = alices_chat()
    for room in ("general", "random"):
        app.conversations[room] = app.conversation_for(room)
        app.sessions[room] = RoomSession(app.link, room)
    app.current = "random"
    out = app.sessions["random"].send("too long for the server")
    app.sessions["random"].outbox.refused(out.client_msg_id, for_good=True, reason="too long")
    app.leave("random")
    assert any("too long for the server  (you left it; refused)" in line
               for line in app.unsent({})), app.unsent({})


def alices_chat_on(server: Any) -> Any:
    """Alice's chat screen, without a terminal, whose calls go to ``server`` (a stand-in
    with the methods a test needs), in #general with a session of its own."""
    from tsnetchat.client import Link, RoomSession
    from tsnetchat.tui import ChatApp

    async def dial() -> Any:
        return server

    app = ChatApp(Link(dial), pb.WhoAmIResponse(identity=pb.Identity(
        login="alice@tailnet.test", display_name="Alice")))
    app.conversations["general"] = app.conversation_for("general")
    app.sessions["general"] = RoomSession(app.link, "general")
    app.current = "general"
    return app


class Changes:
    """A server stand-in that takes edits and deletions."""

    target = None

    def __init__(self) -> None:
        self.done: list[tuple[str, int]] = []

    async def delete(self, room: str, target: int) -> None:
        self.done.append(("delete", target))

    async def edit(self, room: str, target: int, text: str) -> None:
        self.done.append(("edit", target))


async def test_a_delete_of_a_message_scrolled_out_of_view_says_it_was_done() -> None:
    """Bob wrote 40 lines after alice's; her /delete deleted it above the screen, and
    nothing on the screen changed or said so (a daily user's day, 2026-11-25)."""
    server = Changes()
    app = alices_chat_on(server)
    general = app.conversations["general"]
    mine = msg(1, "the password is hunter2", who="alice")
    general.add_message(mine, own=True, mention=False, shown=True, live=True)
    for i in range(2, 42):
        general.add_message(msg(i), own=False, mention=False, shown=True, live=True)
    assert app.handle("/delete") is False
    await asyncio.gather(*app.background)
    assert server.done == [("delete", 1)]
    said = general.entries[-1].text
    assert said.startswith("deleted your message of ") and "out of view" in said, said
    assert "hunter2" not in said
    # On screen, the line itself shows it: nothing more is said.
    general.add_message(msg(42, "fixed", who="alice"), own=True, mention=False, shown=True,
                        live=True)
    app.handle("/edit fixed, really")
    await asyncio.gather(*app.background)
    assert server.done[-1] == ("edit", 42)
    assert general.entries[-1].id == 42


async def test_a_bare_away_while_already_away_without_a_message_says_so() -> None:
    """The server answers only a change, so a second bare /away said nothing at all
    (one with the same message said "you are already away")."""
    app = alices_chat_on(Changes())
    said = app.conversations["general"].entries
    app.away = ""  # away, without a message
    app.handle("/away")
    assert [e.text for e in said] == ["you are already away"]
    app.away = "lunch"
    app.handle("/away")  # (a change: the message goes)
    assert len(said) == 1


@pytest.mark.parametrize(("typed", "room"), [
    ("#Ops", "ops"), ("+ops", "+ops"), ("@bob", "dm:alice@tailnet.test,bob@tailnet.test"),
    (None, None)])
def test_connect_room_that_is_a_room_is_the_one_shown(typed: str | None, room: str) -> None:
    from tsnetchat.tui import room_to_show

    assert room_to_show(typed, "alice@tailnet.test") == (room, "")


@pytest.mark.parametrize("typed", ["#", "##", "+", "no room"])
def test_connect_room_that_cannot_be_a_room_is_said_as_typed_and_not_asked_for(
        typed: str) -> None:
    """`--room '#'` said "cannot join ##" (and left the chat in no room)."""
    from tsnetchat.tui import room_to_show

    room, wrong = room_to_show(typed, "alice@tailnet.test")
    assert room is None
    assert wrong.startswith(f"--room {typed!r} is not a room: "), wrong


async def test_a_room_closed_for_good_by_a_kick_shows_no_members_in_the_status_bar() -> None:
    """Bob, kicked from #general, read "2 members │ failed" below the line that said he
    was removed (a daily user's day, 2026-11-25); /who listed them too."""
    from tsnetchat.client import SessionEvent
    from tsnetchat.clienterrors import ClientError

    app = alices_chat_on(Changes())
    general, session = app.conversations["general"], app.sessions["general"]
    general.members = [msg(1, who="alice").sender, msg(1, who="bob").sender]
    assert "2 members" in "".join(t for _, t in app.status_bar())
    err = ClientError("you were removed from 'general' by bob@tailnet.test", retryable=False)
    session.state.connected(0.0)
    session.state.lost(err, 1.0, 0.5)
    app.on_event(general, session, SessionEvent("fatal", error=err))
    bar = "".join(t for _, t in app.status_bar())
    assert "member" not in bar and "failed" in bar, bar
    app.handle("/who")
    assert general.entries[-1].text.startswith("#general is closed for good"), (
        general.entries[-1].text)


async def test_the_status_bar_of_a_search_buffer_ends_with_its_title_not_a_separator(
        ) -> None:
    """It read " alice@tailnet.test (alice-laptop) │ ?restart │", the bar cut short after
    its last bar (a daily user's day, 2026-11-25); away, it says so after the bar."""
    from tsnetchat.tui import SEARCH

    app = alices_chat_on(Changes())
    app.conversations[SEARCH] = Conversation(SEARCH, kind="search", title="?restart")
    app.current = SEARCH
    assert "".join(t for _, t in app.status_bar()).endswith(" │ ?restart")
    app.away = "lunch"
    assert "".join(t for _, t in app.status_bar()).endswith(" │ ?restart │ away: /back")


async def test_a_line_for_a_room_typed_in_the_search_buffer_says_how_to_get_back_to_one(
        ) -> None:
    """"not in a room: /join ROOM first" was said to a person in #general who was reading a
    search's results; /who there said "in ?lid: nobody" (a daily user's day, 2026-11-25)."""
    from tsnetchat.tui import SEARCH

    app = alices_chat_on(Changes())
    app.conversations[SEARCH] = Conversation(SEARCH, kind="search", title="?lid")
    app.current = SEARCH
    for line in ("a message", "/me waves", "/topic new", "/edit fixed", "/who"):
        app.handle(line)
        said = app.conversations[SEARCH].entries[-1].text
        assert said.startswith("this buffer holds a search's results: Alt-1 (or Ctrl-N) "
                               "shows a room, /leave closes it"), (line, said)
        assert "not in a room" not in said and "nobody" not in said
    assert app.input.text == ""  # (the lines kept are the callers': handle says True)
    assert app.handle("a message") is True


async def test_a_terminal_gone_under_a_suspended_chat_is_one_line_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """A chat stopped with Ctrl-Z whose terminal was then closed logged three tracebacks of
    EIO (the redraw after the stop, a redraw, SIGCONT's) and "internal error" (2026-11-25)."""
    import errno
    import logging

    from tsnetchat.tui import _on_loop_error

    app = alices_chat()
    handler = _on_loop_error(app)
    gone = OSError(errno.EIO, "Input/output error")
    with caplog.at_level(logging.INFO, logger="tsnetchat.tui"):
        for where in ("Task exception was never retrieved", "Exception in callback redraw",
                      "Exception in callback ChatApp.resumed()"):
            handler(asyncio.get_running_loop(), {"message": where, "exception": gone})
    lines = [r for r in caplog.records if r.name == "tsnetchat.tui"]
    assert [r.getMessage() for r in lines] == [
        "the terminal went away (Input/output error): the chat ends as with /quit, keeping "
        "what was not sent"], lines
    assert lines[0].exc_info is None
    assert app.quitting
    assert not any("internal error" in e.text for e in app.system.entries)


async def test_a_bug_met_anywhere_in_the_chat_is_said_in_the_one_way_clienterrors_says_it(
        ) -> None:
    """A command's bug named the failure; the event loop's and an event's said only its
    class, each in words of its own (a daily user's day, 2026-11-25)."""
    from tsnetchat.tui import _on_loop_error, log_path

    app = alices_chat()
    _on_loop_error(app)(asyncio.get_running_loop(), {"message": "Exception in callback",
                                                     "exception": KeyError("general")})
    assert app.system.entries[-1].text == (
        f"internal error in the client (KeyError: 'general'); see {log_path()}")


async def test_a_room_stopped_by_a_bug_is_closed_and_keeps_what_is_typed_for_it() -> None:
    """It said "#general stopped after an internal error" and went on showing it connected:
    lines typed there waited, pending, for ever (a daily user's day, 2026-11-25)."""
    from collections.abc import AsyncIterator

    from tsnetchat.client import RoomSession, SessionEvent
    from tsnetchat.resume import Phase

    app = alices_chat()
    conv = app.conversations["general"] = app.conversation_for("general")
    app.current = "general"

    class Broken(RoomSession):
        async def events(self) -> AsyncIterator[SessionEvent]:
            self.state.connected(0.0)  # open, as it was before the bug
            yield SessionEvent("state")
            raise RuntimeError("a bug in the session")

    session = app.sessions["general"] = Broken(app.link, "general")
    await app._pump(conv, session)
    assert session.state.phase is Phase.FAILED
    said = conv.entries[-1].text
    assert said.startswith("#general is closed for good: internal error in the client "
                           "(RuntimeError: a bug in the session); see "), said
    assert "/join #general asks for it again" in said
    assert app.send("typed after it", pb.MESSAGE_KIND_TEXT, "typed after it")  # kept
    assert not session.outbox.pending


async def test_a_pasted_bidi_override_is_said_at_once_and_shown_escaped_in_the_input() -> None:
    """U+202E pasted into the input reversed what followed it on the screen ("look: exe.live
    done"), and only Enter said it would be refused (a daily user's day, 2026-11-25)."""
    from prompt_toolkit.document import Document
    from prompt_toolkit.layout.processors import TransformationInput

    from tsnetchat.tui import ShownSafe

    app = alices_chat_on(Changes())
    paste(app, "look: \u202eevil.exe\u202c done")
    assert app.input.text == "look: \u202eevil.exe\u202c done"  # kept as pasted, to fix
    said = app.conversations["general"].entries[-1].text
    assert "U+202E" in said and "before you send" in said, said
    ti = TransformationInput(None, None, 0, lambda i: i,  # type: ignore[arg-type]
                             [("", "look: \u202eevil.exe\u202c done")], 40, 1)
    shown = "".join(f[1] for f in ShownSafe().apply_transformation(ti).fragments)
    assert shown == "look: �evil.exe� done"
    # Plain text pasted says nothing, wherever in the input it goes; a terminal's \r\n or \r
    # is a line end (prompt_toolkit's paste).
    app.input.document = Document("[]", 1)
    paste(app, "line one\r\nline two\rthree")
    assert app.input.text == "[line one\nline two\nthree]"
    assert app.conversations["general"].entries[-1].text == said


def paste(app: Any, text: str) -> None:
    """``text`` pasted into ``app``'s input, as a terminal's bracketed paste."""
    from prompt_toolkit.application.current import set_app

    with set_app(app.app):  # (prompt_toolkit's own keys act on the app running)
        app.app.key_processor.feed(KeyPress(Keys.BracketedPaste, text))
        app.app.key_processor.process_keys()


async def test_a_kick_that_closed_no_stream_does_not_say_someone_was_removed() -> None:
    """`/kick nobodyhere` (a typo) said "nobodyhere@tailnet.test was removed from #general
    (0 stream(s) on this server)" (a daily user's day, 2026-11-25)."""

    class Server(Changes):
        async def kick(self, room: str, login: str) -> pb.KickResponse:
            return pb.KickResponse(streams_closed=0 if login.startswith("nobody") else 1)

    app = alices_chat_on(Server())
    said = app.conversations["general"].entries
    app.handle("/kick nobodyhere")
    await asyncio.gather(*app.background)
    assert said[-1].text.startswith("nobodyhere@tailnet.test had no stream in #general on "
                                    "this server: nobody was removed"), said[-1].text
    app.handle("/kick bob")
    await asyncio.gather(*app.background)
    assert said[-1].text.startswith("bob@tailnet.test was removed from #general (1 stream(s)")


async def test_leaving_the_search_buffer_goes_back_to_the_room_the_search_was_typed_in(
        ) -> None:
    """/search in #general, then /leave: it showed @bob, the last buffer open, and the next
    line meant for #general went to bob alone (a daily user's day, 2026-11-25)."""

    class Server(Changes):
        async def search(self, words: str, *, newest: bool, limit: int,
                         offset: int = 0) -> pb.SearchResponse:
            return pb.SearchResponse(messages=[msg(3, "deploy done")])

    app = alices_chat_on(Server())
    dm = dm_name("alice@tailnet.test", "bob@tailnet.test")
    app.conversations[dm] = app.conversation_for(dm)
    app.conversations["random"] = app.conversation_for("random")
    app.handle("/search deploy")
    await asyncio.gather(*app.background)
    assert app.current == "?search"
    app.handle("/search deploy")  # a second search, from the first one's buffer
    await asyncio.gather(*app.background)
    app.handle("/leave")
    assert app.current == "general"


async def test_a_room_closed_for_good_says_that_join_asks_for_it_again() -> None:
    """Kicked, bob read "#general is closed for good" and nothing of the /join that takes
    him back at once (a daily user's day, 2026-11-25)."""
    from tsnetchat.client import RoomSession, SessionEvent
    from tsnetchat.clienterrors import ClientError

    app = alices_chat_on(Changes())
    general, session = app.conversations["general"], app.sessions["general"]
    err = ClientError("you were removed from 'general' by bob@tailnet.test", retryable=False)
    session.state.connected(0.0)
    session.state.lost(err, 1.0, 0.5)
    app.on_event(general, session, SessionEvent("fatal", error=err))
    assert general.entries[-1].text == (
        "#general is closed for good: you were removed from 'general' by bob@tailnet.test; "
        "/join #general asks for it again, /leave closes it")
    # A private room says it is for members: the same words end a kick and a /remove, after
    # which /join is refused (it read as if /join would take bob back; a daily user's day,
    # 2026-11-25).
    team = app.conversations["+team"] = app.conversation_for("+team")
    session = app.sessions["+team"] = RoomSession(app.link, "+team")
    session.state.connected(0.0)
    session.state.lost(err, 1.0, 0.5)
    app.on_event(team, session, SessionEvent("fatal", error=err))
    assert team.entries[-1].text.endswith(
        "; /join +team asks for it again (refused if you are no longer a member of it), "
        "/leave closes it"), team.entries[-1].text


async def test_ctrl_u_clears_a_pasted_block_before_the_cursor_and_ctrl_y_brings_it_back(
        ) -> None:
    """Three pasted lines and Ctrl-U cleared only the last line's text; it took four more
    presses, one per line end, to empty the input (a daily user's day, 2026-11-25)."""
    from prompt_toolkit.application.current import set_app

    app = alices_chat_on(Changes())
    keys = app.app.key_processor
    with set_app(app.app):  # (prompt_toolkit's own keys act on the app running)
        for key in (KeyPress(Keys.BracketedPaste, "one\ntwo\nthree"), KeyPress(Keys.Left),
                    KeyPress(Keys.ControlU)):
            keys.feed(key)
        keys.process_keys()
        assert app.input.text == "e"  # what was after the cursor stays
        keys.feed(KeyPress(Keys.ControlE))
        keys.feed(KeyPress(Keys.ControlY))
        keys.process_keys()
    assert app.input.text == "eone\ntwo\nthre"  # nothing lost: Ctrl-Y puts it back


def test_enter_on_blank_lines_pasted_clears_them() -> None:
    """Blank lines pasted (a paste's line ends with nothing between) stayed in the input, and
    Enter did nothing at all (a review of the unmarked paste, 2026-11-25)."""
    app = alices_chat()
    app.input.text = "\n\n"
    app.submit()
    assert app.input.text == ""
    app.input.text = "   "  # (spaces alone stay, as they were: nothing to send, nothing lost)
    app.submit()
    assert app.input.text == "   "


def test_a_pasted_block_that_begins_with_a_command_is_said_to_be_one_line_too_many() -> None:
    """"/quit" and "bye" pasted as one block was "unknown command /quit\nbye; did you mean
    /quit?" (a review of the unmarked paste, 2026-11-25)."""
    p = commands.parse("/quit\nbye")
    assert isinstance(p, commands.Problem)
    assert p.text == "/quit is a command of one line: send it alone (the lines after it stay " \
        "here to edit)", p.text
    assert isinstance(commands.parse("/me waves\nand smiles"), commands.Parsed)
