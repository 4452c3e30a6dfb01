"""A team's day on the command line, over the real lab (issue 15): `tsnetchat` search,
unread, mentions, edit, delete, topic, dm and room-members run end to end from alice's and
bob's nodes against `tsnetchat serve` on chat-server, and bad input gets a clear error and
the documented exit code (README "Exit codes": 2 bad input, 6 permission denied), never a
Python traceback."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import LabDaemon, free_port, run_cli

pytestmark = pytest.mark.tailnet

ALICE, BOB, MALLORY = "alice@tailnet.test", "bob@tailnet.test", "mallory@tailnet.test"


@pytest.fixture(scope="module")
def server(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDaemon]:
    s = LabDaemon(lab, tmp_path_factory.mktemp("cli-team") / "state", free_port())
    s.start()
    try:
        yield s
    finally:
        s.stop(signal.SIGKILL)


class Person:
    """One login's `tsnetchat` on their own lab node, with a token for every room."""

    def __init__(self, server: LabDaemon, login: str, node: str, *, admin: bool = False):
        self.args = ["--token", server.token(login, (), *(["--admin"] if admin else [])),
                     *server.client_args(node)]

    def __call__(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(command, "chat-server", *args, *self.args)

    def ok(self, command: str, *args: str) -> str:
        out = self(command, *args)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def json(self, command: str, *args: str) -> Any:
        return json.loads(self.ok(command, *args, "--json"))


@pytest.fixture(scope="module")
def alice(server: LabDaemon) -> Person:
    return Person(server, ALICE, "alice-laptop", admin=True)


@pytest.fixture(scope="module")
def bob(server: LabDaemon) -> Person:
    return Person(server, BOB, "bob-laptop")


def refused(out: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """Exit ``code`` with one plain error naming ``words``, and no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    for w in words:
        assert w in out.stderr, out.stderr


def send(person: Person, room: str, text: str) -> int:
    return int(person.json("send", text, "--room", room)["id"])


def test_search_finds_words_newest_first_and_pages(alice: Person, bob: Person) -> None:
    for i in range(3):
        send(alice, "general", f"walrus9 release {i}")
    found = bob.json("search", "walrus9", "--newest", "--limit", "2")
    assert [m["text"] for m in found] == ["walrus9 release 2", "walrus9 release 1"]
    assert "(more: --offset 2)" in bob.ok("search", "walrus9", "--newest", "--limit", "2")
    page = bob.json("search", "walrus9", "--newest", "--limit", "2", "--offset", "2")
    assert [m["text"] for m in page] == ["walrus9 release 0"]
    assert {m["text"] for m in bob.json("search", "walrus*", "--author", ALICE)} == {
        f"walrus9 release {i}" for i in range(3)}


def test_unread_and_mentions_show_what_bob_has_not_read(alice: Person, bob: Person) -> None:
    bob.ok("whoami")  # the server knows bob's name
    mid = send(alice, "random", "bob, the gannet4 deploy needs you")
    counts = bob.json("unread")
    assert counts["mentions"] >= 1
    mentions = bob.json("mentions")
    assert [(m["id"], m["text"]) for m in mentions if "gannet4" in m["text"]] == [
        (mid, "bob, the gannet4 deploy needs you")]
    assert [m["mentions"] for m in mentions if m["id"] == mid] == [[BOB]]
    assert "random: " in bob.ok("unread")


def test_edit_and_delete_change_ones_own_message(alice: Person, bob: Person) -> None:
    mid = send(bob, "general", "the ibis3 typo")
    said = bob.ok("edit", str(mid), "the ibis3 fix", "--room", "general")
    assert said.startswith(f"edited #{mid} in general (#"), said
    history = bob.json("history", "--room", "general")
    assert [m["text"] for m in history if m["id"] == mid] == ["the ibis3 fix"]
    said = bob.ok("delete", str(mid), "--room", "general")
    assert said.startswith(f"deleted #{mid} in general (#"), said
    assert not bob.json("search", "ibis3")
    assert bob.ok("search", "ibis3") == "no messages match\n"


def test_mentions_says_so_when_nothing_mentions_you(server: LabDaemon) -> None:
    mallory = Person(server, MALLORY, "mallory-laptop")
    assert mallory.ok("mentions") == "no unread mentions\n"
    assert mallory.json("mentions") == []


def test_topic_is_set_and_shown_to_others(alice: Person, bob: Person) -> None:
    tid = alice.json("topic", "Release week: okapi5 freeze", "--room", "general")["id"]
    (event,) = [m for m in bob.json("history", "--room", "general") if m["id"] == tid]
    assert (event["kind"], event["text"]) == ("topic", "Release week: okapi5 freeze")
    # Without text it is shown, as the chat's /topic (it was a "Missing argument" box).
    assert bob.ok("topic", "--room", "general") == (
        "topic of general: Release week: okapi5 freeze (set by alice@tailnet.test)\n")
    assert bob.json("topic", "--room", "general")["topic"] == "Release week: okapi5 freeze"


def test_dm_reaches_only_its_members(alice: Person, bob: Person, server: LabDaemon) -> None:
    alice.ok("dm", BOB, "psst heron6")
    room = f"dm:{ALICE},{BOB}"
    assert [m["text"] for m in bob.json("history", "--room", f"dm:{ALICE}")] == ["psst heron6"]
    assert [m["room"] for m in bob.json("search", "heron6")] == [room]
    mallory = Person(server, MALLORY, "mallory-laptop")
    assert not mallory.json("search", "heron6")
    # a conversation with a login nobody has (a typo) is refused naming it, as search
    # refuses it ("no messages" read as an empty conversation; a daily user's day, 2026-11-25)
    typo = bob("history", "--room", "dm:alcie@tailnet.test")
    assert typo.returncode == 2, typo.stdout
    assert "nobody with the login 'alcie@tailnet.test'" in typo.stderr, typo.stderr
    # A short name is a login at one's own domain, as the chat's /msg takes it.
    assert bob.ok("dm", "alice", "short and sweet heron7").startswith("sent #")
    assert "short and sweet heron7" in [m["text"] for m in alice.json(
        "history", "--room", f"dm:{BOB}")]
    # ... and `--room` takes what the chat's /join and /msg take: #room, @person, dm:name
    for typed in ("@bob", "dm:bob"):
        assert "short and sweet heron7" in [m["text"] for m in alice.json(
            "history", "--room", typed)]
    assert alice.ok("send", "--room", "#General", "hashed heron8").startswith("sent #")
    assert "hashed heron8" in [m["text"] for m in bob.json("history", "--room", "general")]


def test_a_typod_room_outside_the_token_names_the_allowed_room_it_may_mean(
        alice: Person, bob: Person) -> None:
    """`--room genral` read as a refusal of the room meant (a new user's day, 2026-11-24)."""
    send(alice, "general", "there is a general")
    out = bob("history", "--room", "genral")
    assert (out.returncode, out.stderr) == (6, "error: you may not use room 'genral' "
                                            "(allowed: general, random; did you mean "
                                            "'general'?)\n")
    out = bob("history", "--room", "zzzz")
    assert (out.returncode, out.stderr) == (6, "error: you may not use room 'zzzz' "
                                            "(allowed: general, random)\n")


def test_every_command_that_takes_a_room_takes_a_direct_messages_short_name(
        alice: Person, bob: Person) -> None:
    """tail, topic, edit, delete and search said "'bob' is not a tailnet login" to a
    `--room` that send and history took (a new user's day, 2026-11-24)."""
    room = f"dm:{ALICE},{BOB}"
    mid = send(alice, "@bob", "short heron9")
    assert [m["room"] for m in alice.json("search", "heron9", "--room", "@bob")] == [room]
    assert alice.json("edit", str(mid), "short heron10", "--room", "dm:bob")["room"] == room
    lines = bob.ok("tail", "--room", "@alice", "--after", str(mid - 1), "--count", "2",
                   "--json").splitlines()
    assert [(m["kind"], m["text"]) for m in map(json.loads, lines) if m["type"] == "message"
            ] == [("text", "short heron10"), ("edit", "short heron10")]
    assert json.loads(lines[-1])["room"] == room
    assert alice.json("delete", str(mid), "--room", "@bob")["room"] == room
    assert bob.json("topic", "--room", "dm:alice")["room"] == room
    assert bob.json("topic", "--room", f"dm:{ALICE}")["room"] == room  # (the full form too)
    # dm takes @bob as --room does; search's --author a short name
    assert alice.json("dm", "@bob", "at heron11", "--timeout", "20")["room"] == room
    assert [m["text"] for m in bob.json("search", "heron11", "--author", "alice")] == [
        "at heron11"]
    # search names the rooms and the author it looked in; it and history refuse a typo'd one
    assert alice.ok("search", "nothing-like-it", "--room", "@bob", "--author", "alice") == (
        f"no messages match in dm:{ALICE},{BOB} from {ALICE}\n")
    for command, typo in ((("search", "heron11"), ("--room", "@bobb")),
                          (("search", "heron11"), ("--author", "bobb")),
                          (("history",), ("--room", "@bobb"))):
        out = run_cli(command[0], "chat-server", *command[1:], *typo, *alice.args)
        assert out.returncode != 0 and "nobody with the login 'bobb@tailnet.test'" in (
            out.stderr), (command, typo, out.stderr)


def test_send_split_reads_a_long_text_from_stdin_and_sends_it_in_parts(
        alice: Person, bob: Person) -> None:
    text = "\n".join(f"log line {i:04d} okapi7 " + "x" * 40 for i in range(120))  # 7 KB
    out = run_cli("send", "chat-server", "-", "--split", "--json", "--room", "#General",
                  *alice.args, input=text)
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout)["ids"]
    got = {m["id"]: m["text"] for m in bob.json("history", "--room", "general")}
    assert len(ids) == 2 and "\n".join(got[i] for i in ids) == text
    refused(alice("send", "x" * 5000), 2, "the limit is 4096 bytes",
            "(--split sends it as several messages)")


def test_room_members_creates_a_private_room_and_invites(alice: Person, bob: Person) -> None:
    made = alice.json("room-members", "+ops", "--create", "--add", ALICE)
    assert made["members"] == [ALICE]
    # a login nobody has is refused (a typo was kept as a member, and bob left out) ...
    refused(alice("room-members", "+ops", "--add", "bbo@tailnet.test"), 2,
            "nobody with the login 'bbo@tailnet.test'", "Nobody was added")
    refused(alice("room-members", "+typo", "--create", "--add", "nosuch@tailnet.test"), 2)
    # ... one on the tailnet is somebody's, though they never used this server, and
    # capitals are forgiven as in a DM (the one person who has that login)
    assert MALLORY in alice.json("room-members", "+ops", "--add", "Mallory@Tailnet.Test")[
        "members"]
    alice.ok("room-members", "+ops", "--remove", MALLORY)
    refused(bob("history", "--room", "+ops"), 6)
    alice.ok("room-members", "+ops", "--add", BOB)
    send(alice, "+ops", "ops only")
    assert [m["text"] for m in bob.json("history", "--room", "+ops")] == ["ops only"]


def test_bad_input_gets_a_clear_error_and_exit_code_2_never_a_traceback(
        alice: Person, bob: Person) -> None:
    refused(bob("search", ""), 2, "no words")
    refused(bob("search", "!!!"), 2, "no words")
    refused(bob("edit", "seven", "text"), 2, "message_id")
    refused(bob("delete", "7x"), 2, "message_id")
    # ids are per room: edit and delete name theirs (`delete SERVER 2` meant for a DM
    # deleted #general's 2)
    refused(bob("delete", "2"), 2, "Missing option '--room'")
    refused(bob("edit", "2", "text"), 2, "Missing option '--room'")
    refused(alice("topic", "x" * 5000, "--room", "general"), 2, "topic")
    refused(alice("room-members", "+nowhere", "--add", BOB), 2, "+nowhere")


def test_changing_a_message_that_is_not_yours_is_refused(alice: Person, bob: Person) -> None:
    mid = send(alice, "general", "alice's own words")
    refused(bob("edit", str(mid), "bob's words", "--room", "general"), 6)
    refused(bob("delete", str(mid), "--room", "general"), 6)
    refused(bob("edit", "999999", "text", "--room", "general"), 2)
    assert [m["text"] for m in bob.json("history", "--room", "general")
            if m["id"] == mid] == ["alice's own words"]


def test_a_room_the_server_does_not_serve_is_refused_with_the_rooms_it_does(
        alice: Person, bob: Person) -> None:
    for out in (bob("edit", "1", "text", "--room", "nosuchroom"),
                bob("topic", "hello", "--room", "nosuchroom"),
                bob("search", "walrus9", "--room", "nosuchroom")):
        refused(out, 6, "nosuchroom", "allowed: general, random")
    # A private room or conversation one may not read is not refused: that would tell
    # that it exists. The search finds nothing there.
    assert bob.json("search", "walrus9", "--room", "+secret") == []
    refused(bob("topic", "hello", "--room", "Bad Room!"), 2, "Bad Room!")
