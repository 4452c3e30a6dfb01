"""What a running chat has typed and not had stored, on disk while it runs, for the next chat
when it ends without its exit (tsnetchat.keepsafe, and tui's ``_take_over`` of it)."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tsnetchat import keepsafe, openrooms, tui
from tsnetchat.keepsafe import Held, KeepSafe

HELD = Held(("general", "+ops"), "+ops", (("+ops", "ops", "half a line\nand more \ud83d"),),
            ("#general: sent before the crash  (sent, not confirmed: it may have been stored)",))


def chat_in_another_process(state: Path, server: str, held: Held) -> subprocess.Popen[str]:
    """A process that keeps ``held`` as a chat does, and then waits to be killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tsnetchat.keepsafe import Held, KeepSafe
        keep = KeepSafe.open(Path({str(state)!r}), {server!r})
        keep.keep(Held(*{(held.rooms, held.shown, held.drafts, held.lines)!r}))
        print("kept", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "kept\n"
    return proc


def test_a_chat_killed_leaves_what_it_held_to_the_next_chat_with_its_server_once(
        tmp_path: Path) -> None:
    proc = chat_in_another_process(tmp_path, "chat-server:50051", HELD)
    try:
        assert keepsafe.take_orphans(tmp_path, "chat-server:50051") == []  # still running
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert keepsafe.take_orphans(tmp_path, "chat-server:50051") == [HELD]
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []
    assert keepsafe.take_orphans(tmp_path, "chat-server:50051") == []  # taken once


def test_what_a_chat_with_another_server_left_waits_for_a_chat_with_that_server(
        tmp_path: Path) -> None:
    proc = chat_in_another_process(tmp_path, "other:50051", HELD)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert keepsafe.take_orphans(tmp_path, "chat-server:50051") == []
    assert keepsafe.take_orphans(tmp_path, "other:50051") == [HELD]


def test_a_running_chat_in_this_very_process_is_not_taken_from(tmp_path: Path) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.keep(HELD)
    assert keepsafe.take_orphans(tmp_path, "s:1") == []
    keep.close(remove=False)  # an exit that could not keep them elsewhere: as if killed
    assert keepsafe.take_orphans(tmp_path, "s:1") == [HELD]


def test_a_clean_exit_leaves_nothing_behind(tmp_path: Path) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.keep(HELD)
    assert stat.S_IMODE(keep.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keep.path.parent.stat().st_mode) == 0o700
    keep.close()
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []
    assert keepsafe.take_orphans(tmp_path, "s:1") == []


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
    keep.path.unlink()  # (as if killed between making its lock and its first write)
    keep.close(remove=False)
    assert keepsafe.take_orphans(tmp_path, "s:1") == []
    assert list((tmp_path / keepsafe.FOLDER).iterdir()) == []


@pytest.mark.parametrize("body", ["{not json", "[]", '{"server": "s:1"}', "\x00\xff",
                                  '{"server": "s:1", "rooms": 5, "drafts": [], "lines": []}'])
def test_a_damaged_file_is_said_in_the_log_removed_and_never_an_error(
        tmp_path: Path, body: str, caplog: pytest.LogCaptureFixture) -> None:
    keep = KeepSafe.open(tmp_path, "s:1")
    assert keep is not None
    keep.path.write_text(body, encoding="utf-8", errors="surrogateescape")
    keep.close(remove=False)
    with caplog.at_level(logging.WARNING):
        assert keepsafe.take_orphans(tmp_path, "s:1") == []
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
    keep.close()


def test_a_folder_that_cannot_be_made_leaves_the_chat_to_keep_at_its_exit_only(
        tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert KeepSafe.open(blocker, "s:1") is None
    assert keepsafe.take_orphans(blocker, "s:1") == []


def test_the_next_chat_takes_the_rooms_and_drafts_back_and_the_lines_into_unsent_txt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    state = tui.log_path().parent
    openrooms.save(state, "s:1", openrooms.OpenRooms(("general",), "general",
                                                     (("general", "from a clean exit"),)))
    proc = chat_in_another_process(state, "s:1", Held(
        ("general", "+ops"), "+ops",
        (("+ops", "ops", "half a line"), ("general", "#general", "and one here"),
         ("", "no room", "typed with no room")),
        ("#general: not confirmed  (sent, not confirmed: it may have been stored)",)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last, inherited = tui._take_over(state, "s:1")
    assert inherited == []  # (in unsent.txt)
    assert last.rooms == ("general", "+ops") and last.shown == "+ops"  # the newest rooms
    assert dict(last.drafts) == {"general": "from a clean exit\nand one here",
                                 "+ops": "half a line"}
    text = (state / "unsent.txt").read_text()
    assert "from a chat that ended without its exit, not sent or not confirmed:" in text
    assert "  #general: not confirmed  (sent, not confirmed: it may have been stored)\n" in text
    assert "  (typed in ops; back in its input) half a line\n" in text
    assert "  (typed in no room) typed with no room\n" in text
    assert tui._take_over(state, "s:1") == (openrooms.load(state, "s:1"), [])  # once


def test_lines_left_that_unsent_txt_cannot_take_stay_with_the_next_chat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    state = tui.log_path().parent
    proc = chat_in_another_process(state, "s:1", HELD)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (state / "unsent.txt").mkdir()  # (cannot be appended to)
    _, inherited = tui._take_over(state, "s:1")
    assert inherited == [*HELD.lines, "(typed in ops; back in its input) half a line\n"
                         "    and more \ud83d"]
