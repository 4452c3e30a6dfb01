"""What a running chat has typed and not had stored, on disk while it runs, for the next chat
when it ends without its exit (tsnetchat.keepsafe, and tui's ``_take_over`` of it)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from tsnetchat import keepsafe, openrooms, tui
from tsnetchat.keepsafe import Held, KeepSafe

HELD = Held(("general", "+ops"), "+ops", (("+ops", "ops", "half a line\nand more \ud83d"),),
            ("#general: sent before the crash  (sent, not confirmed: it may have been stored)",))


def take(state: Path, server: str) -> list[Held]:
    """What the next chat with ``server`` takes, as one whose keeping of it worked."""
    orphans = keepsafe.take_orphans(state, server)
    orphans.forget()
    return orphans.held


def chat_in_another_process(state: Path, server: str, held: Held) -> subprocess.Popen[str]:
    """A process that keeps ``held`` as a chat does, and then waits to be killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tsnetchat.keepsafe import Held, KeepSafe
        keep = KeepSafe.open(Path({str(state)!r}), {server!r})
        keep.keep(Held(*{dataclasses.astuple(held)!r}))
        print("kept", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "kept\n"
    return proc


def killed_chat(state: Path, server: str, held: Held) -> None:
    proc = chat_in_another_process(state, server, held)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_chat_killed_leaves_what_it_held_to_the_next_chat_with_its_server_once(
        tmp_path: Path) -> None:
    proc = chat_in_another_process(tmp_path, "chat-server:50051", HELD)
    try:
        assert take(tmp_path, "chat-server:50051") == []  # still running
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert take(tmp_path, "chat-server:50051") == [HELD]
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []
    assert take(tmp_path, "chat-server:50051") == []  # taken once


def test_a_killed_chats_files_stay_until_what_they_held_is_kept_elsewhere(
        tmp_path: Path) -> None:
    """They were removed as they were read: with the disk full, what they held was then in
    the next chat's memory alone (a review, 2026-11-25)."""
    killed_chat(tmp_path, "s:1", HELD)
    orphans = keepsafe.take_orphans(tmp_path, "s:1")
    assert orphans.held == [HELD]
    assert take(tmp_path, "s:1") == []  # (another chat starting now: they are taken)
    orphans.release()  # (could not keep them: for the next chat)
    assert take(tmp_path, "s:1") == [HELD]
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []


def test_what_a_chat_with_another_server_left_waits_for_a_chat_with_that_server(
        tmp_path: Path) -> None:
    proc = chat_in_another_process(tmp_path, "other:50051", HELD)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert take(tmp_path, "chat-server:50051") == []
    assert take(tmp_path, "other:50051") == [HELD]


def test_a_running_chat_in_this_very_process_is_not_taken_from(tmp_path: Path) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.keep(HELD)
    assert take(tmp_path, "s:1") == []
    keep.close(remove=False)  # an exit that could not keep them elsewhere: as if killed
    assert take(tmp_path, "s:1") == [HELD]


def test_a_clean_exit_leaves_nothing_behind(tmp_path: Path) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.keep(HELD)
    assert stat.S_IMODE(keep.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keep.path.parent.stat().st_mode) == 0o700
    keep.close()
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []
    assert take(tmp_path, "s:1") == []


def test_the_file_is_written_only_when_what_it_holds_changes(tmp_path: Path) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.keep(HELD)
    first = keep.path.stat().st_ino  # (each write replaces the file: a new inode)
    keep.keep(Held(HELD.rooms, HELD.shown, HELD.drafts, HELD.lines))
    assert keep.path.stat().st_ino == first
    keep.keep(Held(HELD.rooms, HELD.shown, HELD.drafts, ()))
    assert keep.path.stat().st_ino != first
    assert json.loads(keep.path.read_text())["lines"] == []
    keep.close()


def test_a_chat_killed_before_it_wrote_anything_leaves_nothing_to_take(tmp_path: Path) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.close(remove=False)  # (as if killed between making its lock and its first write)
    assert take(tmp_path, "s:1") == []
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []


@pytest.mark.parametrize("body", ["{not json", "[]", '{"rooms": []}', "\x00\xff",
                                  '{"server": "s:1", "rooms": "abc"}', "[" * 99_999 + "]" * 99_999,
                                  '{"server": "s:1", "drafts": [[1, 2, 3]], "lines": {"a": 1}}',
                                  '{"server": "s:1", "rooms": 5, "drafts": [], "lines": []}'])
def test_a_damaged_file_is_said_in_the_log_removed_and_never_an_error(
        tmp_path: Path, body: str, caplog: pytest.LogCaptureFixture) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.path.write_text(body, encoding="utf-8", errors="surrogateescape")
    keep.close(remove=False)
    with caplog.at_level(logging.WARNING):
        assert take(tmp_path, "s:1") == []
    assert "is damaged" in caplog.text
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []


def test_a_write_that_fails_is_said_once_in_the_log_and_the_chat_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    shutil.rmtree(keep.path.parent)  # (its folder went)
    with caplog.at_level(logging.INFO):
        keep.keep(HELD)
        keep.keep(Held(HELD.rooms))
    assert caplog.text.count("could not keep what is typed") == 1
    assert "No such file" in keep.failing  # (for the chat to say)
    keep.close()


def test_a_fifo_or_folder_named_like_a_lock_is_passed_over_without_waiting(
        tmp_path: Path) -> None:
    """A FIFO by a lock's name hung the chat's start, blank, deaf to Ctrl-C (2026-11-25)."""
    folder = tmp_path / keepsafe.FOLDER
    folder.mkdir()
    os.mkfifo(folder / "1-x.lock")
    (folder / "2-y.lock").mkdir()
    assert take(tmp_path, "s:1") == []
    assert sorted(p.name for p in folder.iterdir()) == ["1-x.lock", "2-y.lock"]


def test_a_write_cut_short_by_a_kill_leaves_no_file_behind_once_taken(tmp_path: Path) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.keep(HELD)
    keep.path.with_name(f".{keep.path.name}.tmp").write_text('{"server": "s:1", "ro')
    keep.close(remove=False)
    assert take(tmp_path, "s:1") == [HELD]
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []


def test_a_folder_that_cannot_be_made_leaves_the_chat_to_keep_at_its_exit_only(
        tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert KeepSafe.open(blocker, "s:1") is None
    assert take(blocker, "s:1") == []


def test_the_next_chat_takes_the_rooms_and_drafts_back_and_the_lines_into_unsent_txt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    state = tui.log_path().parent
    openrooms.save(state, "s:1", openrooms.OpenRooms(("general", "random"), "general", (
        ("general", "from a clean exit"), ("random", "other chat's draft"))))
    killed_chat(state, "s:1", Held(
        ("general", "+ops"), "+ops",
        (("+ops", "ops", "half a line"), ("general", "#general", "and one here"),
         ("", "no room", "typed with no room")),
        ("#general: not confirmed  (sent, not confirmed: it may have been stored)",)))
    taken = tui._take_over(state, "s:1")
    assert taken.inherited == []  # (in unsent.txt)
    # Every chat's rooms (the killed one's first) and every chat's drafts, each in its room.
    assert taken.rooms.rooms == ("general", "+ops", "random") and taken.rooms.shown == "+ops"
    assert dict(taken.rooms.drafts) == {"general": "from a clean exit\nand one here",
                                        "+ops": "half a line", "random": "other chat's draft"}
    assert taken.took == {"general": "from a clean exit", "random": "other chat's draft"}
    text = (state / "unsent.txt").read_text()
    assert ("s:1, from a chat that ended without keeping them, not sent or not confirmed:"
            in text), text
    assert "  #general: not confirmed  (sent, not confirmed: it may have been stored)\n" in text
    assert "  (typed in ops; back in its input) half a line\n" in text
    assert "  (typed in no room) typed with no room\n" in text
    # Taken once, and out of the file of open rooms: a chat killed later does not bring
    # them back (they are in its own file while it runs).
    again = tui._take_over(state, "s:1")
    assert again.rooms == replace(taken.rooms, drafts=()) and again.took == {}


def test_rooms_a_killed_chat_had_left_do_not_come_back_from_the_exit_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chat opened #general, #random and @bob from the last exit, left #random, or all
    three, and was killed: the next one opened all three again, from that exit (a daily
    user's day, 2026-11-25). An exit while the killed chat ran is as new: its rooms stay."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    state = tui.log_path().parent
    before = openrooms.OpenRooms(("general", "random", "dm:bob@x"), "random")
    openrooms.save(state, "s:1", before)
    killed_chat(state, "s:1", Held(("general",), "general"))
    assert tui._take_over(state, "s:1").rooms == openrooms.OpenRooms(("general",), "general")
    openrooms.save(state, "s:1", before)
    killed_chat(state, "s:1", Held(lines=("#general: sent  (sent, not confirmed)",)))
    assert tui._take_over(state, "s:1").rooms == openrooms.OpenRooms()  # (#general opens)
    # Another chat's exit while this one ran: both chats' rooms.
    running = chat_in_another_process(state, "s:1", Held(("general",), "general"))
    openrooms.save(state, "s:1", before)
    running.send_signal(signal.SIGKILL)
    running.wait()
    assert tui._take_over(state, "s:1").rooms.rooms == ("general", "random", "dm:bob@x")


def test_a_draft_a_killed_chat_had_brought_back_unchanged_is_not_added_to_unsent_txt_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three kills of a chat holding the draft it had brought back added it three times
    (a kill -9 run, 2026-11-25)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    state = tui.log_path().parent
    for _ in range(3):
        killed_chat(state, "s:1", Held(("general",), "general",
                                       (("general", "#general", "the plan"),),
                                       as_restored=("general",)))
        taken = tui._take_over(state, "s:1")
        assert dict(taken.rooms.drafts) == {"general": "the plan"}
    assert not (state / "unsent.txt").exists()


def test_lines_left_that_unsent_txt_cannot_take_stay_with_the_next_chat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    state = tui.log_path().parent
    killed_chat(state, "s:1", HELD)
    (state / "unsent.txt").mkdir()  # (cannot be appended to)
    taken = tui._take_over(state, "s:1")
    assert taken.inherited == [*HELD.lines, "(typed in ops; back in its input) half a line\n"
                               "    and more \ud83d"]


def test_a_lone_surrogate_is_written_to_unsent_txt_escaped_and_the_rest_as_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half an emoji failed the whole write, and the chat's end, with "This is a bug" (a
    kill -9 run, 2026-11-25)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path, not_kept = tui._keep_unsent(["half \ud83d", "ça va \udcff"], "s:1")
    assert not_kept == ""
    assert path.read_bytes().endswith(b"  half \\ud83d\n  " + "ça va ".encode() + b"\xff\n")


def test_text_in_any_script_is_kept_as_utf_8_and_comes_back_exactly(tmp_path: Path) -> None:
    """Escaped as ASCII, a long CJK paste made a file six times its size, past what is read
    back: all of that chat's lines were lost as "damaged" (a review, 2026-11-25)."""
    typed = "日本語の文" * 20_000 + " \ud83d \udcff"  # (and half an emoji, a byte not UTF-8)
    held = Held(("general",), "general", (("general", "#general", typed),))
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.keep(held)
    assert keep.path.stat().st_size < 4 * len(typed)  # (3 bytes a character, not 6)
    keep.close(remove=False)
    assert take(tmp_path, "s:1") == [held]
