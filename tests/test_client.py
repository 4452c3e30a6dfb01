"""The scripting client over the real lab: discovery, send, tail, history and their errors.
The terminal chat is in test_tui.py."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, LabDaemon, free_port, lab_daemon, run_cli

from tsnetchat.discovery import find_peer
from tsnetchat.errors import PeerNotFound
from tsnetchat.tailnet import parse_status

pytestmark = pytest.mark.tailnet


@pytest.fixture
def chat_server(lab: Any, tmp_path: Path) -> Iterator[LabDaemon]:
    s = LabDaemon(lab, tmp_path / "state", free_port())
    s.start()
    try:
        yield s
    finally:
        s.stop(signal.SIGKILL)


# --- discovery ---------------------------------------------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return proc.stdout.readline()


def test_send_and_tail_from_a_third_node(chat_server: LabDaemon) -> None:
    tok = chat_server.token("mallory@tailnet.test")
    tail = subprocess.Popen([CLI, "tail", "chat-server", "--room", "random", "--count", "2",
                             "--json", "--token", tok, *chat_server.client_args("mallory-laptop")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live = json.loads(read_line(tail))  # an empty backlog, then the marker
    assert live == {"type": "live", "room": "random", "last_id": 0}
    for text in ("first", "second"):
        out = run_cli("send", "chat-server", text, "--room", "random", "--json",
                      "--token", chat_server.token("alice@tailnet.test"),
                      *chat_server.client_args("alice-laptop"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"id": 1 if text == "first" else 2, "room": "random"}
    stdout, stderr = tail.communicate(timeout=30)
    assert tail.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [(m["type"], m["id"], m["text"], m["from"], m["kind"]) for m in lines] == [
        ("message", 1, "first", "alice@tailnet.test", "text"),
        ("message", 2, "second", "alice@tailnet.test", "text")]
    assert lines[0]["node"] == "alice-laptop.tailnet.test" and lines[0]["name"] == "Alice"
    assert isinstance(lines[0]["ts"], int) and lines[0]["ts"] > 1_700_000_000_000  # ms
    # mallory can also send from her node (no grant is required by default).
    out = run_cli("send", "chat-server", "from mallory", "--room", "random", "--token", tok,
                  *chat_server.client_args("mallory-laptop"))
    assert out.returncode == 0 and "sent #3 to random" in out.stdout
    hist = run_cli("history", "chat-server", "--room", "random", "--json", "--token", tok,
                   *chat_server.client_args("mallory-laptop"))
    page = json.loads(hist.stdout)  # one array
    assert [m["text"] for m in page] == ["first", "second", "from mallory"]
    assert page[0] == lines[0]  # one shape for a message everywhere


def test_tail_new_shows_only_what_comes_after_a_live_marker(chat_server: LabDaemon) -> None:
    alice = chat_server.token("alice@tailnet.test")
    args = ["--token", alice, *chat_server.client_args("alice-laptop")]
    for text in ("old one", "old two"):
        assert run_cli("send", "chat-server", text, *args).returncode == 0
    tail = subprocess.Popen([CLI, "tail", "chat-server", "--new", "--count", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert read_line(tail).strip() == "── live: new messages in #general from here ──"
    assert run_cli("send", "chat-server", "the new one", "--action", *args).returncode == 0
    stdout, _ = tail.communicate(timeout=30)
    assert tail.returncode == 0
    assert "old" not in stdout
    assert re.fullmatch(r"── \w+ \d\d \w+ \d{4} ──\n\d\d:\d\d \* Alice the new one\n", stdout)


def test_history_text_hangs_continuation_lines_under_the_text(chat_server: LabDaemon) -> None:
    args = ["--token", chat_server.token("alice@tailnet.test"),
            *chat_server.client_args("alice-laptop")]
    forged = "hi\n[09:00:00] <Bob> send me your token"
    assert run_cli("send", "chat-server", forged, *args).returncode == 0
    out = run_cli("history", "chat-server", *args)
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"── .* ──", lines[0])
    assert re.fullmatch(r"\d\d:\d\d <Alice> hi", lines[1])
    assert lines[2] == "            ┊ [09:00:00] <Bob> send me your token"


def test_send_when_nothing_listens_on_the_port_says_so_plainly(chat_server: LabDaemon) -> None:
    tok = chat_server.token("alice@tailnet.test")
    chat_server.stop()
    # (the process's own start counts too: up to 7 s for --timeout 3, still short of 8)
    for timeout, within in (("3", (2.5, 7.0)), ("20", (7.5, 14.0))):  # up to 8 s, in --timeout
        started = time.monotonic()
        out = run_cli("send", "chat-server", "hello?", "--timeout", timeout, "--token", tok,
                      *chat_server.client_args("alice-laptop"))
        took = time.monotonic() - started
        assert out.returncode == 7
        assert out.stderr.strip() == (
            "error: the message was not sent: chat-server is on the tailnet but nothing "
            f"answers on port {chat_server.port}: is `tsnetchat serve` running there?")
        assert within[0] <= took <= within[1], (timeout, took)


def wait_for_stderr_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stderr.readline() if ready else ""
        if re.search(pattern, line):
            return line
        assert line or proc.poll() is None, f"exited {proc.returncode} before {pattern!r}"
    raise AssertionError(f"no {pattern!r} on stderr within {timeout}s")


@pytest.mark.parametrize("command", [["whoami"], ["history", "--json"], ["send", "hello"],
                                     ["tail", "--count", "1", "--json"],
                                     ["topic", "retried topic", "--json"],
                                     # (a DM's short name gave up at once: a new user's day)
                                     ["send", "hello", "--room", "@bob"],
                                     ["dm", "@bob", "hello"]])
def test_a_command_started_while_its_server_is_down_goes_through_once_it_is_up(
        chat_server: LabDaemon, command: list[str]) -> None:
    tok = chat_server.token("alice@tailnet.test")
    if command[0] == "tail":
        run_cli("send", "chat-server", "already there", "--token", tok,
                *chat_server.client_args("alice-laptop"))
    chat_server.stop()
    proc = subprocess.Popen([CLI, command[0], "chat-server", *command[1:], "--token", tok,
                             *chat_server.client_args("alice-laptop")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if command[0] not in ("send", "dm"):  # (they wait quietly, within their --timeout)
            line = wait_for_stderr_line(proc, r"trying again")
            assert line.startswith("cannot reach chat-server yet: trying again (chat-server is "
                                   "on the tailnet but nothing answers on port"), line
        chat_server.start()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    if command[0] == "whoami":
        assert json.loads(stdout)["login"] == "alice@tailnet.test"
    elif command[0] == "history":
        assert json.loads(stdout) == []
    elif command[0] in ("send", "dm"):
        to = "general" if command[0] == "send" and "@bob" not in command else (
            "dm:alice@tailnet.test,bob@tailnet.test")
        assert stdout.strip() == f"sent #1 to {to}"
    elif command[0] == "topic":
        assert json.loads(stdout) == {"id": 1, "room": "general"}
        history = run_cli("history", "chat-server", "--json", "--token", tok,
                          *chat_server.client_args("alice-laptop"))
        assert [m["text"] for m in json.loads(history.stdout)] == ["retried topic"]
    else:
        assert json.loads(stdout.splitlines()[0])["text"] == "already there"


def test_a_members_change_started_while_the_server_is_down_goes_through_once_it_is_up(
        chat_server: LabDaemon) -> None:
    tok = chat_server.token("alice@tailnet.test", (), "--admin")
    made = run_cli("room-members", "chat-server", "+ops", "--create", "--add", "alice@tailnet.test",
                   "--token", tok, *chat_server.client_args("alice-laptop"))
    assert made.returncode == 0, made.stderr
    chat_server.stop()
    proc = subprocess.Popen([CLI, "room-members", "chat-server", "+ops", "--add",
                             "bob@tailnet.test", "--json", "--token", tok,
                             *chat_server.client_args("alice-laptop")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_stderr_line(proc, r"^cannot reach chat-server yet: trying again")
        chat_server.start()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout) == {"room": "+ops",
                                  "members": ["alice@tailnet.test", "bob@tailnet.test"]}


def test_a_room_creation_is_not_repeated_when_the_server_is_down(
        chat_server: LabDaemon) -> None:
    tok = chat_server.token("alice@tailnet.test", (), "--admin")
    chat_server.stop()
    started = time.monotonic()
    out = run_cli("room-members", "chat-server", "+ops", "--create", "--add", "bob@tailnet.test",
                  "--token", tok, *chat_server.client_args("alice-laptop"))
    assert out.returncode == 7, out.stderr
    assert "trying again" not in out.stderr
    assert time.monotonic() - started < 8, "a creation must fail at once, not wait out a grace"


def test_a_room_the_token_does_not_allow_exits_6_with_the_reason(
        chat_server: LabDaemon) -> None:
    tok = chat_server.token("bob@tailnet.test", ("general",))
    out = run_cli("send", "chat-server", "hi", "--room", "ops", "--token", tok,
                  *chat_server.client_args("bob-laptop"))
    assert out.returncode == 6
    assert out.stderr.startswith("error: ") and "ops" in out.stderr
    assert "PERMISSION_DENIED" not in out.stderr and "Traceback" not in out.stderr


def test_full_name_and_tailnet_ip_work_too(lab: Any, chat_server: LabDaemon) -> None:
    tok = chat_server.token("bob@tailnet.test")
    for name in ("chat-server.tailnet.test", "chat-server.tailnet.test.",
                 lab.nodes["chat-server"].ipv4):
        out = run_cli("whoami", name, "--token", tok, *chat_server.client_args("bob-laptop"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["login"] == "bob@tailnet.test"


def test_no_such_peer_suggests_the_closest_names(chat_server: LabDaemon) -> None:
    out = run_cli("send", "chat-servr", "hi", "--token", "x",
                  *chat_server.client_args("bob-laptop"))
    assert out.returncode == 4
    assert "no peer named 'chat-servr'" in out.stderr and "did you mean chat-server" in out.stderr
    # once: the steps tried say what each saw, not the suggestions again
    assert out.stderr.count("did you mean") == 1, out.stderr
    assert "1. LocalAPI: " in out.stderr and "not among the " in out.stderr, out.stderr


def test_tailscaled_not_running_is_explained(tmp_path: Path) -> None:
    out = run_cli("send", "chat-server", "hi", "--token", "x", "--socket",
                  str(tmp_path / "no.sock"))
    assert out.returncode == 4 and "Is tailscaled running?" in out.stderr


def test_offline_peer_shows_last_seen(lab: Any, chat_server: LabDaemon) -> None:
    mallory = lab.nodes["mallory-laptop"]
    lab.kill_tailscaled(mallory)
    try:
        deadline = time.monotonic() + 60
        while True:
            out = run_cli("send", "mallory-laptop", "hi", "--token", "x",
                      *chat_server.client_args("bob-laptop"))
            if "offline" in out.stderr or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.returncode == 4
        assert "mallory-laptop is on the tailnet but offline (last seen" in out.stderr
    finally:
        lab.start_tailscaled(mallory)
        lab.wait_running(mallory)


def test_magicdns_off_is_explained() -> None:
    """Pure logic on a status as tailscaled reports it with MagicDNS off."""
    st = parse_status({"BackendState": "Running", "Self": {"HostName": "me"},
                       "Peer": {"k": {"HostName": "chat-server", "DNSName": "",
                                      "TailscaleIPs": ["100.64.0.1"], "Online": True}},
                       "CurrentTailnet": {"MagicDNSEnabled": False}})
    with pytest.raises(PeerNotFound, match="MagicDNS is off"):
        find_peer(st, "chat-servr")
    assert find_peer(st, "100.64.0.1").host_name == "chat-server"




# --- what a person may get wrong ----------------------------------------------------------


@pytest.mark.parametrize(("args", "code", "words"), [
    (["whoami", ""], 2, "no server given"),
    (["whoami", "a" * 300], 2, "is not a server name"),
    (["whoami", "100.64.0.99"], 4, "no peer named '100.64.0.99' on this tailnet"),
    (["whoami", "alice-laptop"], 4, "alice-laptop is this machine"),
])
def test_bad_input_and_wrong_targets_are_one_line_with_their_exit_code(
        chat_server: LabDaemon, args: list[str], code: int, words: str) -> None:
    out = run_cli(*args, *chat_server.client_args("alice-laptop"))
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr and "no token for" not in out.stderr
    assert out.stderr.startswith("error: ") and words in out.stderr


@pytest.mark.parametrize(("content", "words"), [
    (b"\xff\xfe", "does not hold a token: it is not text"),
    (b"", "is empty"),
    (b"t" * 20_000, "does not hold a token: it is longer than 4096 characters"),
])
def test_a_token_file_without_a_token_is_said_for_commands_and_doctor(
        chat_server: LabDaemon, tmp_path: Path, content: bytes, words: str) -> None:
    f = tmp_path / "token"
    f.write_bytes(content)
    for cmd in (["whoami", "chat-server"], ["doctor", "--server", "chat-server"]):
        out = run_cli(*cmd, "--token-file", str(f), *chat_server.client_args("alice-laptop"))
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"error: token file {f} {words}")
        assert len(out.stderr.splitlines()) == 1


def test_history_and_tail_show_edits_deletions_and_topics_as_the_chat_does(
        chat_server: LabDaemon) -> None:
    args = ["--token", chat_server.token("alice@tailnet.test"),
            *chat_server.client_args("alice-laptop")]
    tail = subprocess.Popen([CLI, "tail", "chat-server", "--count", "6", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(tail).startswith("── live")
        for step in (["send", "chat-server", "the wrong text"],
                     ["edit", "chat-server", "1", "the corrected text", "-r", "general"],
                     ["send", "chat-server", "oops"],
                     ["delete", "chat-server", "3", "--room", "general"],
                     ["topic", "chat-server", "release week"], ["topic", "chat-server", ""]):
            done = run_cli(*step, *args)
            assert done.returncode == 0, done.stderr
        live = tail.communicate(timeout=30)[0].splitlines()
    finally:
        tail.kill()
    hist = run_cli("history", "chat-server", *args).stdout.splitlines()
    texts = [re.sub(r"^\d\d:\d\d ", "", line) for line in hist[1:]]
    assert texts == ["<Alice> the corrected text (edited)", "<Alice> (deleted)",
                     "-- Alice set the topic: release week", "-- Alice cleared the topic"]
    live_texts = [re.sub(r"^\d\d:\d\d ", "", line) for line in live]
    assert live_texts[0].startswith("── ")  # the day
    assert live_texts[1:3] == ["<Alice> the wrong text",
                               live_texts[2]]  # (the edit's notice names the time)
    assert re.fullmatch(r"-- Alice edited their message of \d\d:\d\d: the corrected text",
                        live_texts[2])
    assert live_texts[3] == "<Alice> oops"
    assert re.fullmatch(r"-- Alice deleted their message of \d\d:\d\d", live_texts[4])
    assert live_texts[5:] == ["-- Alice set the topic: release week",
                              "-- Alice cleared the topic"]


def test_tail_after_an_id_past_the_end_says_there_is_no_such_message(
        chat_server: LabDaemon) -> None:
    args = ["--token", chat_server.token("alice@tailnet.test"),
            *chat_server.client_args("alice-laptop")]
    assert run_cli("send", "chat-server", "only one", *args).returncode == 0
    out = run_cli("tail", "chat-server", "--after", "100000", "--count", "1", *args)
    assert out.returncode == 0, out.stderr
    assert "there is no message 100000 to start after: the server's history ends at " \
           "message 1; showing #general from what the server has" in out.stderr
    assert "restored or replaced" not in out.stderr


def test_login_says_where_a_token_cannot_be_kept_and_leaves_a_newer_store_alone(
        lab: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the config directory should be")
    newer = tmp_path / "config" / "tsnetchat" / "tokens.json"
    newer.parent.mkdir(parents=True)
    newer.write_text('{"version": 99, "servers": {"from": "the future"}}')
    newer.chmod(0o600)
    with lab_daemon(lab, tmp_path, "--enroll", "grant") as s:
        for config, words in ((blocker, f"cannot save tokens in {blocker}/tsnetchat/tokens.json"),
                              (newer.parent.parent, "written by a newer tsnetchat")):
            out = run_cli("login", "chat-server", *s.client_args("alice-laptop"),
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                               "XDG_CONFIG_HOME": str(config)})
            assert out.returncode == 3, out.stderr
            assert out.stderr.startswith("error: ") and words in out.stderr
            assert "Traceback" not in out.stderr
    assert newer.read_text() == '{"version": 99, "servers": {"from": "the future"}}'
