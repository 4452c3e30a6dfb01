"""The client over the real lab: discovery, send/tail, and the terminal chat in tmux."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, need

from tsnetchat.discovery import find_peer
from tsnetchat.errors import PeerNotFound
from tsnetchat.tailnet import parse_status

pytestmark = pytest.mark.tailnet

CLI = str(Path(sys.executable).with_name("tsnetchat"))


@dataclass
class ServerProc:
    """`tsnetchat serve` on the chat-server node, restartable on the same state and port."""

    lab: Any
    state: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.state.parent / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [CLI, "serve", "--state-dir", str(self.state), "--socket",
             self.lab.nodes["chat-server"].socket, "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if subprocess.run(["ss", "-ltnH", f"sport = :{self.port}"], capture_output=True,
                              text=True).stdout.strip():
                return
            assert self.proc.poll() is None
            time.sleep(0.1)
        raise AssertionError("server did not listen")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    def token(self, login: str) -> str:
        return subprocess.run([CLI, "token", "issue", login, "--state-dir", str(self.state)],
                              capture_output=True, text=True, check=True).stdout.strip()

    def client_args(self, node: str) -> list[str]:
        n = self.lab.nodes[node]
        return ["--socket", n.socket, "--port", str(self.port), "--proxy", n.http_proxy]


@pytest.fixture
def chat_server(lab: Any, tmp_path: Path) -> Iterator[ServerProc]:
    s = ServerProc(lab, tmp_path / "state", free_port())
    s.start()
    try:
        yield s
    finally:
        s.stop(signal.SIGKILL)


def cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, **kw)


# --- discovery ---------------------------------------------------------------------------


def test_send_and_tail_from_a_third_node(chat_server: ServerProc) -> None:
    tok = chat_server.token("mallory@tailnet.test")
    tail = subprocess.Popen([CLI, "tail", "chat-server", "--room", "random", "--count", "2",
                             "--json", "--token", tok, *chat_server.client_args("mallory-laptop")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # let the subscription start; it would also catch up from history
    for text in ("first", "second"):
        out = cli("send", "chat-server", text, "--room", "random", "--json",
                  "--token", chat_server.token("alice@tailnet.test"),
                  *chat_server.client_args("alice-laptop"))
        assert out.returncode == 0, out.stderr
    stdout, stderr = tail.communicate(timeout=30)
    assert tail.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [(m["id"], m["text"], m["from"]) for m in lines] == [
        (1, "first", "alice@tailnet.test"), (2, "second", "alice@tailnet.test")]
    assert lines[0]["node"] == "alice-laptop.tailnet.test"
    # mallory can also send from her node (no grant is required by default).
    out = cli("send", "chat-server", "from mallory", "--room", "random", "--token", tok,
              *chat_server.client_args("mallory-laptop"))
    assert out.returncode == 0 and "sent #3 to random" in out.stdout
    hist = cli("history", "chat-server", "--room", "random", "--json", "--token", tok,
               *chat_server.client_args("mallory-laptop"))
    assert [json.loads(x)["text"] for x in hist.stdout.splitlines()] == [
        "first", "second", "from mallory"]


def test_full_name_and_tailnet_ip_work_too(lab: Any, chat_server: ServerProc) -> None:
    tok = chat_server.token("bob@tailnet.test")
    for name in ("chat-server.tailnet.test", "chat-server.tailnet.test.",
                 lab.nodes["chat-server"].ipv4):
        out = cli("whoami", name, "--token", tok, *chat_server.client_args("bob-laptop"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["login"] == "bob@tailnet.test"


def test_no_such_peer_suggests_the_closest_names(chat_server: ServerProc) -> None:
    out = cli("send", "chat-servr", "hi", "--token", "x", *chat_server.client_args("bob-laptop"))
    assert out.returncode == 4
    assert "no peer named 'chat-servr'" in out.stderr and "did you mean chat-server" in out.stderr


def test_tailscaled_not_running_is_explained(tmp_path: Path) -> None:
    out = cli("send", "chat-server", "hi", "--token", "x", "--socket", str(tmp_path / "no.sock"))
    assert out.returncode == 4 and "Is tailscaled running?" in out.stderr


def test_offline_peer_shows_last_seen(lab: Any, chat_server: ServerProc) -> None:
    mallory = lab.nodes["mallory-laptop"]
    lab.kill_tailscaled(mallory)
    try:
        deadline = time.monotonic() + 60
        while True:
            out = cli("send", "mallory-laptop", "hi", "--token", "x",
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


# --- the terminal chat in tmux -------------------------------------------------------------


class Tmux:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name = name
        exports = " ".join(f"{k}={_q(v)}" for k, v in env.items())
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "120", "-y", "40",
                        f"env {exports} {' '.join(_q(c) for c in cmd)}; sleep 30"], check=True)

    def type(self, text: str, enter: bool = True) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)
        if enter:
            subprocess.run(["tmux", "send-keys", "-t", self.name, "Enter"], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name],
                              capture_output=True, text=True).stdout

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.screen()
            if re.search(pattern, s):
                return s
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} not on {self.name}'s screen:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture
def terminals(chat_server: ServerProc) -> Iterator[dict[str, Tmux]]:
    if shutil.which("tmux") is None:
        need("tmux", "make sysdeps installs it")
    env = {"TERM": "xterm-256color", "PATH": os.environ["PATH"], "HOME": os.environ["HOME"],
           "LANG": "C.UTF-8"}
    sessions: dict[str, Tmux] = {}
    try:
        for who, node in (("alice", "alice-laptop"), ("bob", "bob-laptop")):
            tok = chat_server.token(f"{who}@tailnet.test")
            sessions[who] = Tmux(f"tsnetchat-test-{who}-{os.getpid()}",
                                 [CLI, "connect", "chat-server", "--token", tok,
                                  *chat_server.client_args(node)], env)
        for t in sessions.values():
            t.wait_for(r"joined #general")
        yield sessions
    finally:
        for t in sessions.values():
            t.kill()


def count(screen: str, text: str) -> int:
    return len(re.findall(re.escape(text), screen))


@pytest.mark.tmux
def test_alice_and_bob_chat_in_their_terminals(terminals: dict[str, Tmux]) -> None:
    alice, bob = terminals["alice"], terminals["bob"]
    alice.type("hello bob")
    screen = bob.wait_for(r"<Alice> hello bob")
    assert re.search(r"\d\d:\d\d <Alice> hello bob", screen)
    bob.type("/me waves")
    alice.wait_for(r"\* Bob waves")
    assert "connected" in alice.screen()  # status line
    alice.type("/who")
    alice.wait_for(r"in #general: .*Alice.*Bob|in #general: .*Bob.*Alice")


@pytest.mark.tmux
def test_message_arriving_mid_typing_appears_above_the_input_line(
        terminals: dict[str, Tmux]) -> None:
    alice, bob = terminals["alice"], terminals["bob"]
    alice.type("half a thought", enter=False)
    bob.type("interrupting")
    screen = alice.wait_for(r"<Bob> interrupting")
    lines = [line for line in screen.splitlines() if line.strip()]
    bob_line = next(i for i, line in enumerate(lines) if "<Bob> interrupting" in line)
    prompt_line = next(i for i, line in enumerate(lines) if "#general> half a thought" in line)
    assert bob_line < prompt_line  # above the line being typed, which is intact
    alice.type(" finished")
    bob.wait_for(r"<Alice> half a thought finished")


@pytest.mark.tmux
def test_server_restart_mid_conversation_no_gap_no_duplicate(
        chat_server: ServerProc, terminals: dict[str, Tmux]) -> None:
    alice, bob = terminals["alice"], terminals["bob"]
    alice.type("one")
    bob.wait_for(r"<Alice> one")
    chat_server.stop(signal.SIGKILL)
    alice.wait_for(r"reconnecting")
    alice.type("two (typed while the server was down)")
    time.sleep(1)
    chat_server.start()
    bob.wait_for(r"<Alice> two \(typed while the server was down\)", timeout=40)
    bob.type("three")
    bob.wait_for(r"<Bob> three", timeout=40)
    alice.wait_for(r"<Bob> three", timeout=40)
    for t in (alice, bob):
        s = t.screen()
        assert count(s, "<Alice> one") == 1
        assert count(s, "<Alice> two (typed while the server was down)") == 1
        assert count(s, "<Bob> three") == 1


@pytest.mark.tmux
def test_client_tailscaled_restart_mid_conversation_no_gap_no_duplicate(
        lab: Any, terminals: dict[str, Tmux]) -> None:
    alice, bob = terminals["alice"], terminals["bob"]
    bob.type("before")
    alice.wait_for(r"<Bob> before")
    node = lab.nodes["alice-laptop"]
    lab.kill_tailscaled(node)
    try:
        alice.wait_for(r"reconnecting", timeout=60)
        bob.type("while alice's tailscaled was down")
        bob.wait_for(r"<Bob> while alice's tailscaled was down")
    finally:
        lab.start_tailscaled(node)
        lab.wait_running(node)
    alice.wait_for(r"<Bob> while alice's tailscaled was down", timeout=60)
    bob.type("after")
    alice.wait_for(r"<Bob> after", timeout=30)
    s = alice.screen()
    for text in ("<Bob> before", "<Bob> while alice's tailscaled was down", "<Bob> after"):
        assert count(s, text) == 1, s
