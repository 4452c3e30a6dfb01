"""The rooms a chat had open, remembered per server for the next one (tsnetchat.openrooms)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tsnetchat import openrooms
from tsnetchat.openrooms import OpenRooms


def test_the_rooms_saved_for_a_server_come_back_in_order_with_the_one_shown(
        tmp_path: Path) -> None:
    key = openrooms.server_key("chat-server", 50051)
    openrooms.save(tmp_path, key, OpenRooms(("general", "+ops", "dm:a@x,b@x"), "+ops"))
    assert openrooms.load(tmp_path, key) == OpenRooms(("general", "+ops", "dm:a@x,b@x"), "+ops")
    path = openrooms.path_for(tmp_path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_each_server_has_its_own_rooms_and_the_name_typed_is_forgiven_its_case(
        tmp_path: Path) -> None:
    openrooms.save(tmp_path, openrooms.server_key("chat-server", 50051),
                   OpenRooms(("general",), "general"))
    openrooms.save(tmp_path, openrooms.server_key("chat-server-2", 50051),
                   OpenRooms(("random",), None))
    assert openrooms.load(tmp_path, openrooms.server_key("Chat-Server.", 50051)).rooms == (
        "general",)
    assert openrooms.load(tmp_path, openrooms.server_key("chat-server-2", 50051)).rooms == (
        "random",)
    assert openrooms.load(tmp_path, openrooms.server_key("chat-server", 9000)) == OpenRooms()
    assert openrooms.server_key("chat-server", 50051, address="127.0.0.1:9") == "127.0.0.1:9"


def test_the_server_is_known_by_its_magicdns_name_whatever_name_was_typed() -> None:
    keys = {openrooms.server_key(typed, 50051, dns_name="chat-server.tailnet.test")
            for typed in ("chat-server", "Chat-Server.tailnet.test.", "100.64.0.1")}
    assert keys == {"chat-server.tailnet.test:50051"}


def test_two_keys_alike_once_made_safe_for_a_file_name_have_two_files(tmp_path: Path) -> None:
    assert openrooms.path_for(tmp_path, "a b:1") != openrooms.path_for(tmp_path, "a_b:1")


def test_a_key_cannot_name_a_file_outside_the_folder(tmp_path: Path) -> None:
    path = openrooms.path_for(tmp_path, "../../etc/passwd:1")
    assert path.parent == tmp_path / openrooms.FOLDER and "/" not in path.name


@pytest.mark.parametrize("body", [
    "{not json", "[]", '{"rooms": "general"}', '{"rooms": [1, null, ""], "shown": 1}',
    '{"shown": "general"}', "\x00\xff", '{"rooms": ["general"], "drafts": ["a"]}'])
def test_a_damaged_file_is_no_rooms_and_never_an_error(tmp_path: Path, body: str) -> None:
    path = openrooms.path_for(tmp_path, "s:1")
    path.parent.mkdir(parents=True)
    path.write_text(body, encoding="utf-8")
    assert openrooms.load(tmp_path, "s:1") == OpenRooms()


def test_a_shown_room_that_is_not_among_the_rooms_is_not_shown(tmp_path: Path) -> None:
    path = openrooms.path_for(tmp_path, "s:1")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"rooms": ["general", "general", "random"], "shown": "ops"}))
    assert openrooms.load(tmp_path, "s:1") == OpenRooms(("general", "random"), None)


def test_a_link_in_place_of_the_file_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"rooms": ["secret"]}))
    path = openrooms.path_for(tmp_path, "s:1")
    path.parent.mkdir(parents=True)
    path.symlink_to(elsewhere)
    assert openrooms.load(tmp_path, "s:1") == OpenRooms()
    openrooms.save(tmp_path, "s:1", OpenRooms(("general",), "general"))
    assert json.loads(elsewhere.read_text()) == {"rooms": ["secret"]}  # replaced, not written
    assert openrooms.load(tmp_path, "s:1").rooms == ("general",)


def test_a_state_dir_that_cannot_be_written_loses_the_list_quietly(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert openrooms.save(blocker, "s:1", OpenRooms(("general",), None, (("general", "x"),))
                          ) == {}  # no exception, and no draft said to be kept
    assert openrooms.load(blocker, "s:1") == OpenRooms()


def test_at_most_max_rooms_are_opened_from_a_file(tmp_path: Path) -> None:
    many = [f"r{i}" for i in range(openrooms.MAX_ROOMS + 10)]
    openrooms.save(tmp_path, "s:1", OpenRooms(tuple(many), None))
    assert len(openrooms.load(tmp_path, "s:1").rooms) == openrooms.MAX_ROOMS


def test_what_was_typed_in_each_room_comes_back_with_it_exactly_as_typed(
        tmp_path: Path) -> None:
    typed = (("general", "half a line\n  and an indented one\t"), ("dm:a@x,b@x", "psst \ud83d"),
             ("+ops", "ça va? 日本語 👍"))
    written = openrooms.save(tmp_path, "s:1",
                             OpenRooms(("general", "+ops", "dm:a@x,b@x"), None, typed))
    assert written == dict(typed)  # (what the chat says will be back)
    back = openrooms.load(tmp_path, "s:1")
    assert dict(back.drafts) == dict(typed)  # a lone surrogate too (pasted half an emoji)
    assert [room for room, _ in back.drafts] == ["general", "+ops", "dm:a@x,b@x"]  # in order


def test_a_draft_is_kept_only_for_a_room_that_opens_again(tmp_path: Path) -> None:
    openrooms.save(tmp_path, "s:1", OpenRooms(("general",), None, (("left-it", "gone"),
                                                                    ("general", "kept"))))
    assert openrooms.load(tmp_path, "s:1").drafts == (("general", "kept"),)
    path = openrooms.path_for(tmp_path, "s:1")
    path.write_text(json.dumps({"rooms": ["general", "random"],
                                "drafts": {"random": 5, "ops": "x", "general": "ok"}}))
    assert openrooms.load(tmp_path, "s:1") == OpenRooms(("general", "random"), None,
                                                        (("general", "ok"),))


def test_drafts_too_long_for_the_file_are_left_out_and_the_others_still_come_back(
        tmp_path: Path) -> None:
    rooms = tuple(f"r{i}" for i in range(10))
    long = "x" * (openrooms.MAX_DRAFT + 1)
    full = "y" * openrooms.MAX_DRAFT
    typed = (("r0", long), *((r, full) for r in rooms[1:]))
    written = openrooms.save(tmp_path, "s:1", OpenRooms(rooms, "r0", typed))
    back = openrooms.load(tmp_path, "s:1")
    assert written == dict(back.drafts)
    assert back.rooms == rooms and back.shown == "r0"
    kept = dict(back.drafts)
    assert "r0" not in kept  # too long for one room (it is in unsent.txt, see tui)
    assert sum(map(len, kept.values())) <= openrooms.MAX_DRAFTS
    assert kept == {r: full for r in rooms[1:1 + openrooms.MAX_DRAFTS // openrooms.MAX_DRAFT]}
    assert openrooms.path_for(tmp_path, "s:1").stat().st_size <= openrooms.MAX_FILE


def test_a_second_chat_ending_keeps_the_drafts_the_first_one_left_in_the_file(
        tmp_path: Path) -> None:
    openrooms.save(tmp_path, "s:1", OpenRooms(("general", "+ops"), "general",
                                              (("general", "first's"), ("+ops", "ops plan"))))
    written = openrooms.save(tmp_path, "s:1", OpenRooms(("general", "random"), "random", (
        ("general", "second's"), ("random", "hi"))), took={})
    assert written == {"general": "second's", "random": "hi"}  # (ours: what we say is back)
    back = openrooms.load(tmp_path, "s:1")
    assert back.rooms == ("general", "random", "+ops") and back.shown == "random"
    assert dict(back.drafts) == {"general": "first's\nsecond's", "random": "hi",
                                 "+ops": "ops plan"}
    openrooms.save(tmp_path, "s:1", OpenRooms(("general",), None, (
        ("general", "first's\nsecond's"),)), took={})  # (the same text twice is once)
    assert dict(openrooms.load(tmp_path, "s:1").drafts)["general"] == "first's\nsecond's"
    openrooms.save(tmp_path, "s:1", OpenRooms(("general",), None))  # (without: ours alone)
    assert openrooms.load(tmp_path, "s:1").drafts == ()


def test_a_draft_a_chat_took_at_its_start_and_sent_is_not_kept_as_another_chats(
        tmp_path: Path) -> None:
    """Taking it out of the file at the start failed (a full disk): at the exit it read as
    another chat's, and came back after it had been sent (a kill -9 run, 2026-11-25)."""
    openrooms.save(tmp_path, "s:1", OpenRooms(("general",), None, (("general", "draft D"),)))
    openrooms.save(tmp_path, "s:1", OpenRooms(("general",), None), took={"general": "draft D"})
    assert openrooms.load(tmp_path, "s:1").drafts == ()


def test_two_chats_drafts_too_long_together_keep_this_ones(tmp_path: Path) -> None:
    first, second = "a" * (openrooms.MAX_DRAFT - 10), "b" * 20
    openrooms.save(tmp_path, "s:1", OpenRooms(("general",), None, (("general", first),)))
    written = openrooms.save(tmp_path, "s:1", OpenRooms(("general",), None, (
        ("general", second),)), took={})
    assert written == {"general": second}
    assert dict(openrooms.load(tmp_path, "s:1").drafts) == {"general": second}
