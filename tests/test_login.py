"""`tsnetchat login` over the real lab: people get their own token, bound to their tailnet
login, with rooms from the tailnet grant, kept fresh while they use it.

The server is the real `tsnetchat serve` on chat-server; each person is a `tsnetchat`
process on their own lab node (through its HTTP proxy), with a config dir of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, LabDaemon, Lines, apply_policy, extra_node, free_port, lab_daemon

pytestmark = pytest.mark.tailnet

VENV_BIN = str(Path(sys.executable).parent)
ALICE, BOB, MALLORY = "alice@tailnet.test", "bob@tailnet.test", "mallory@tailnet.test"
TTL = 12.0  # seconds, for the renewal tests: renewed after 6 s, expired after 12 s


class Person:
    """One person on one device: their own config dir (where tokens are kept)."""

    def __init__(self, lab: Any, server: LabDaemon, node: str, home: Path) -> None:
        self.node, self.server, self.home = lab.nodes[node], server, home
        home.mkdir(parents=True, exist_ok=True)

    @property
    def store(self) -> Path:
        return self.home / "config" / "tsnetchat" / "tokens.json"

    def env(self) -> dict[str, str]:
        return {"PATH": VENV_BIN, "HOME": str(self.home), "LANG": "C.UTF-8",
                "XDG_CONFIG_HOME": str(self.home / "config")}

    def args(self) -> list[str]:
        return ["--socket", self.node.socket, "--proxy", f"http://{self.node.http_proxy}",
                "--port", str(self.server.port)]

    def __call__(self, cmd: str, *args: str, server: str = "chat-server"
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, cmd, server, *args, *self.args()], env=self.env(),
                              capture_output=True, text=True, timeout=90)

    def popen(self, cmd: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([CLI, cmd, "chat-server", *args, *self.args()], env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stored(self) -> dict[str, Any]:
        entries = json.loads(self.store.read_text())["servers"]
        assert len(entries) == 1, entries
        return entries[0]  # type: ignore[no-any-return]

    def device_of(self, other: Person) -> Person:
        """``other``'s person on this device: their token file, copied here."""
        self.store.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(other.store, self.store)
        return self


@pytest.fixture
def enrolling(lab: Any, tmp_path: Path) -> Iterator[LabDaemon]:
    with lab_daemon(lab, tmp_path, "--enroll", "grant") as s:
        yield s


@pytest.fixture
def short_lived(lab: Any, tmp_path: Path) -> Iterator[LabDaemon]:
    env = {"TSNETCHAT_ENROLL_TTL_HOURS": str(TTL / 3600)}
    with lab_daemon(lab, tmp_path, "--enroll", "grant", env=env) as s:
        yield s


def person(lab: Any, server: LabDaemon, node: str, tmp_path: Path) -> Person:
    return Person(lab, server, node, tmp_path / node)


def whoami(p: Person, *args: str, server: str = "chat-server") -> dict[str, Any]:
    out = p("whoami", *args, server=server)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# --- getting a token ----------------------------------------------------------------------


def test_alice_with_a_grant_gets_a_token_and_chats_without_handling_it(
        lab: Any, enrolling: LabDaemon, tmp_path: Path) -> None:
    alice = person(lab, enrolling, "alice-laptop", tmp_path)
    out = alice("login")
    assert out.returncode == 0, out.stderr
    assert "logged in to chat-server.tailnet.test as alice@tailnet.test (rooms: general, ops, " \
           "random; admin)" in out.stdout
    assert oct(alice.store.stat().st_mode & 0o777) == "0o600"
    sent = alice("send", "hello, with a token of my own", "--room", "ops")
    assert sent.returncode == 0, sent.stderr
    history = alice("history", "--room", "ops", "--json")
    assert [m["text"] for m in json.loads(history.stdout)] == ["hello, with a token of my own"]
    me = whoami(alice)
    assert me["login"] == ALICE and me["admin"] and me["token_id"].startswith("login-")
    assert sorted(me["rooms"]) == ["general", "ops", "random"]
    # the server logged it, and lists it with the tokens admins issued
    assert f"login issued token={me['token_id']} login={ALICE} " \
           "device=alice-laptop.tailnet.test" in enrolling.log.read_text()
    assert me["token_id"] in enrolling.cli("token", "list")


def test_a_login_typed_as_the_server_starts_waits_for_it(lab: Any, tmp_path: Path) -> None:
    """It failed at once, "nothing answers", where `connect` and `whoami` wait for a server
    that is starting (an operator's run, 2026-11-25)."""
    server = LabDaemon(lab, tmp_path / "state", free_port(), ("--enroll", "grant"))
    alice = person(lab, server, "alice-laptop", tmp_path)
    proc = alice.popen("login")
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # (said once an attempt has found nothing there)
        assert first.startswith("cannot reach chat-server.tailnet.test yet: trying again ("), first
        server.start()
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 0, first + err
    assert "logged in to chat-server.tailnet.test as alice@tailnet.test" in out
    assert "Traceback" not in err


def test_a_person_logged_in_to_two_servers_on_one_node_uses_each_ones_own_token(
        lab: Any, enrolling: LabDaemon, tmp_path: Path) -> None:
    """A test server beside the team's, on the same node: the chat used the newest token
    kept for the node, which the other server refused as another key's (an operator's run,
    2026-11-25)."""
    (tmp_path / "second").mkdir()
    with lab_daemon(lab, tmp_path / "second", "--enroll", "grant") as second:
        home = tmp_path / "alice"
        team, test = Person(lab, enrolling, "alice-laptop", home), Person(
            lab, second, "alice-laptop", home)
        assert team("login").returncode == 0
        assert test("login").returncode == 0
        for p, server in ((team, enrolling), (test, second)):
            me = whoami(p)
            assert me["login"] == ALICE
            assert me["token_id"] in server.cli("token", "list")
            sent = p("send", f"to the server on port {server.port}", "--room", "ops")
            assert sent.returncode == 0, sent.stderr


def test_mallory_without_a_grant_is_refused_and_told_whom_to_ask(
        lab: Any, enrolling: LabDaemon, tmp_path: Path) -> None:
    mallory = person(lab, enrolling, "mallory-laptop", tmp_path)
    out = mallory("login")
    assert out.returncode == 6, out.stderr
    assert "the tailnet policy grants mallory@tailnet.test no access to tsnetchat" in out.stderr
    assert "Ask a tailnet admin to grant it to you, or a tsnetchat admin for a token " \
           "(`tsnetchat token issue mallory@tailnet.test`)" in out.stderr
    assert not mallory.store.exists()
    assert f"login refused login={MALLORY}" in enrolling.log.read_text()


def test_the_token_works_from_alices_second_device_and_not_from_bobs(
        lab: Any, enrolling: LabDaemon, tmp_path: Path) -> None:
    extra_node(lab, "alice-desktop", "alice")
    alice = person(lab, enrolling, "alice-laptop", tmp_path)
    assert alice("login").returncode == 0
    desktop = person(lab, enrolling, "alice-desktop", tmp_path).device_of(alice)
    me = whoami(desktop)
    assert me["login"] == ALICE and me["node"] == "alice-desktop.tailnet.test"
    bob = person(lab, enrolling, "bob-laptop", tmp_path).device_of(alice)
    out = bob("whoami")
    assert out.returncode == 5, out.stderr
    assert "the two locks disagree: the token was issued to 'alice@tailnet.test' but this " \
           "connection comes from bob@tailnet.test" in out.stderr


def test_the_kept_token_is_found_by_short_name_full_name_and_tailnet_ip(
        lab: Any, enrolling: LabDaemon, tmp_path: Path) -> None:
    alice = person(lab, enrolling, "alice-laptop", tmp_path)
    assert alice("login", server="chat-server.tailnet.test").returncode == 0
    chat = lab.nodes["chat-server"]
    for name in ("chat-server", "chat-server.tailnet.test.", chat.ipv4, chat.ipv6):
        assert whoami(alice, server=name)["login"] == ALICE
    # kept under the server's stable node id, not under what was typed
    assert alice.stored()["node_id"] == lab.status(chat)["Self"]["ID"]


def test_a_typo_gets_did_you_mean_before_any_question_about_tokens(
        lab: Any, enrolling: LabDaemon, tmp_path: Path) -> None:
    bob = person(lab, enrolling, "bob-laptop", tmp_path)
    for cmd in ("whoami", "login"):
        out = bob(cmd, server="chat-servr")
        assert out.returncode == 4, out.stderr
        assert ("no peer named 'chat-servr' on this tailnet; did you mean chat-server, "
                "chat-server-2?") in out.stderr
    out = bob("whoami")  # the right name, and no token yet
    assert out.returncode == 5
    assert "no token for chat-server: run `tsnetchat login chat-server`" in out.stderr


def test_admin_issued_tokens_keep_working(lab: Any, enrolling: LabDaemon,
                                          tmp_path: Path) -> None:
    bob = person(lab, enrolling, "bob-laptop", tmp_path)
    tok = enrolling.token(BOB)
    assert whoami(bob, "--token", tok)["login"] == BOB
    # ... also from a token file an older tsnetchat saved by name
    bob.store.parent.mkdir(parents=True)
    bob.store.write_text(json.dumps({"chat-server": tok}))
    bob.store.chmod(0o600)
    me = whoami(bob)
    assert me["login"] == BOB and not me["token_id"].startswith("login-")


def test_with_enrollment_off_alice_is_told_to_ask_the_servers_admin(
        lab: Any, tmp_path: Path) -> None:
    with lab_daemon(lab, tmp_path) as default:  # the default: off
        out = person(lab, default, "alice-laptop", tmp_path)("login")
    assert out.returncode == 6, out.stderr
    assert "chat-server does not hand out tokens itself (enroll = off). Ask its admin for one: " \
           "`tsnetchat token issue alice@tailnet.test`" in out.stderr


def test_enrolling_any_user_gives_mallory_every_room_and_alice_no_more_than_her_grant(
        lab: Any, tmp_path: Path) -> None:
    with lab_daemon(lab, tmp_path, "--enroll", "any") as anyone:
        mallory = person(lab, anyone, "mallory-laptop", tmp_path)
        out = mallory("login")
        assert out.returncode == 0, out.stderr
        assert "(rooms: any room)" in out.stdout
        me = whoami(mallory)
        assert me["rooms"] == ["*"] and not me["admin"]
        bob = person(lab, anyone, "bob-laptop", tmp_path)
        assert bob("login").returncode == 0
        assert sorted(whoami(bob)["rooms"]) == ["general", "random"]


def test_logins_are_rate_limited_per_device(lab: Any, enrolling: LabDaemon,
                                            tmp_path: Path) -> None:
    bob = person(lab, enrolling, "bob-laptop", tmp_path)
    codes = [bob("login").returncode for _ in range(6)]
    assert codes == [0, 0, 0, 0, 0, 1]
    last = bob("login")
    assert "too many logins from this device" in last.stderr
    assert person(lab, enrolling, "alice-laptop", tmp_path)("login").returncode == 0
    assert "login refused login=bob@tailnet.test" in enrolling.log.read_text()


# --- keeping it fresh -----------------------------------------------------------------------


def test_renewal_before_expiry_keeps_a_session_going_across_the_first_tokens_expiry(
        lab: Any, short_lived: LabDaemon, tmp_path: Path) -> None:
    alice = person(lab, short_lived, "alice-laptop", tmp_path)
    bob = person(lab, short_lived, "bob-laptop", tmp_path)
    assert alice("login").returncode == 0
    bob_token = short_lived.token(BOB)  # an admin's token, not short-lived
    first = alice.stored()
    tail = alice.popen("tail", "--room", "general", "--json", "--count", "2")
    lines = Lines(tail)
    try:
        assert bob("send", "before the first token expired", "--token", bob_token).returncode == 0
        assert lines.message()["text"] == "before the first token expired"
        # past its expiry and the server's 5 s of leeway for clocks
        time.sleep(max(0.0, first["received"] + TTL + 7 - time.time()))
        # The token alice started with is dead by now ...
        dead = alice("whoami", "--token", first["token"])
        assert dead.returncode == 5 and "the token has expired" in dead.stderr
        # ... and a restart makes her session connect again, with the renewed one.
        short_lived.restart()
        sent = bob("send", "after the first token expired", "--token", bob_token)
        assert sent.returncode == 0, sent.stderr
        assert lines.message()["text"] == "after the first token expired"
        tail.wait(timeout=30)
        err = tail.stderr.read() if tail.stderr else ""
        assert tail.returncode == 0, err
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    now = alice.stored()
    assert now["token_id"] == first["token_id"] and now["token"] != first["token"]
    assert now["received"] > first["received"] + TTL / 2
    assert f"renew issued token={first['token_id']}" in short_lived.log.read_text()


@pytest.mark.parametrize("source", ["login", "admin"])
def test_a_tail_whose_token_is_revoked_waits_for_a_new_one_and_misses_nothing(
        lab: Any, enrolling: LabDaemon, tmp_path: Path, source: str) -> None:
    """It ended for good (exit 5): the person ran `tsnetchat login` and had to start it again
    (and a chat, losing what they had typed). With an admin's token (kept with `whoami
    --save-token`) it said both "ask an admin" and "`tsnetchat login` gets a new one", which
    a person without a grant is refused (a newcomer, 2026-11-24)."""
    alice = person(lab, enrolling, "alice-laptop", tmp_path)
    bob = person(lab, enrolling, "bob-laptop", tmp_path)
    issued = tmp_path / "alice.token"

    def new_token() -> None:
        if source == "login":
            assert alice("login").returncode == 0
        else:
            issued.write_text(enrolling.token(ALICE) + "\n")
            assert alice("whoami", "--token-file", str(issued), "--save-token").returncode == 0

    new_token()
    bob_token = enrolling.token(BOB)
    tail = alice.popen("tail", "--room", "general", "--json", "--count", "2")
    lines, said = Lines(tail), Lines(tail, err=True)
    try:
        assert bob("send", "before the revocation", "--token", bob_token).returncode == 0
        assert lines.message()["text"] == "before the revocation"
        revoked = alice.stored()["token_id"]
        assert enrolling.cli("token", "revoke", revoked) == f"revoked {revoked}"
        while "carries on by itself once you have a new one" not in (line := said.next()):
            pass
        if source == "login":
            assert "revoked" in line and line.count("tsnetchat login") == 1, line  # said once
        else:
            assert "ask an admin for a new one" in line and "tsnetchat login" not in line, line
            assert ("`tsnetchat whoami chat-server --token-file FILE --save-token` keeps it"
                    in line), line
        assert "(this tail carries on by itself" in line, line  # (it said "this chat")
        assert bob("send", "while alice had no token", "--token", bob_token).returncode == 0
        new_token()
        assert alice.stored()["token_id"] != revoked
        assert lines.message()["text"] == "while alice had no token"
        assert tail.wait(timeout=30) == 0
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()


def test_a_tail_refused_by_a_server_with_another_key_carries_on_once_the_right_one_is_back(
        lab: Any, enrolling: LabDaemon, tmp_path: Path) -> None:
    """It waited for a new token for ever: only a new `connect` helped (a new user's day,
    2026-11-24). Now the same token is tried again now and then (resume.SAME_TOKEN_FIRST)."""
    alice = person(lab, enrolling, "alice-laptop", tmp_path)
    bob = person(lab, enrolling, "bob-laptop", tmp_path)
    assert alice("login").returncode == 0
    token = alice.stored()["token"]
    bob_token = enrolling.token(BOB)
    tail = alice.popen("tail", "--room", "general", "--json", "--count", "2")
    lines, said = Lines(tail), Lines(tail, err=True)
    kept = enrolling.state.with_name("state.kept")
    try:
        assert bob("send", "before the mix-up", "--token", bob_token).returncode == 0
        assert lines.message()["text"] == "before the mix-up"
        enrolling.stop()
        enrolling.state.rename(kept)
        enrolling.start()  # the same address, a new state dir: another key
        while "carries on by itself once you have a new one" not in (line := said.next()):
            pass
        assert "tries this one again" in line, line
        enrolling.stop()
        shutil.rmtree(enrolling.state)
        kept.rename(enrolling.state)
        enrolling.start()
        assert bob("send", "after the mix-up", "--token", bob_token).returncode == 0
        assert lines.message(timeout=90)["text"] == "after the mix-up"
        assert tail.wait(timeout=30) == 0
        assert alice.stored()["token"] == token  # the same token, no new login
        # The journal said, at each start with a new key, to check the state dir.
        assert enrolling.log.read_text().count("made a new signing key") == 2  # not the last
        rest = []
        with contextlib.suppress(AssertionError):  # (no line within the time: none left)
            while True:
                rest.append(said.next(timeout=2))
        assert not [x for x in rest if "carries on by itself" in x], rest  # said once
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()


def test_revocation_stops_renewal(lab: Any, short_lived: LabDaemon, tmp_path: Path) -> None:
    alice = person(lab, short_lived, "alice-laptop", tmp_path)
    assert alice("login").returncode == 0
    kept = alice.stored()
    assert short_lived.cli("token", "revoke", kept["token_id"]) == f"revoked {kept['token_id']}"
    time.sleep(max(0.0, kept["received"] + TTL / 2 + 0.5 - time.time()))  # due for renewal
    for _ in range(2):  # the second time from what the first one stored
        out = alice("whoami")
        assert out.returncode == 5, out.stderr
        assert "chat-server refused to renew your token: token lock: this token has been " \
               "revoked" in out.stderr
        assert "run `tsnetchat login` for a new one" in out.stderr  # said once
        assert out.stderr.count("tsnetchat login") == 1
    assert alice.stored()["dead"]
    assert "renew refused login=alice@tailnet.test" in short_lived.log.read_text()


def test_a_login_token_stops_with_its_grant_and_the_refused_renewal_is_said(
        lab: Any, short_lived: LabDaemon, tmp_path: Path) -> None:
    """It used to last its life without the grant, with every right the grant had given
    (admin included); tests/test_security_continuous.py holds the server to it."""
    import tailnet_lab

    alice = person(lab, short_lived, "alice-laptop", tmp_path)
    assert alice("login").returncode == 0
    kept = alice.stored()
    policy = tailnet_lab.default_policy()
    # (and until chat-server's tailscaled applies it, as every policy change in the tests
    # waits: a late netmap would renew the token)
    asyncio.run(apply_policy(lab, {"grants": [g for g in policy["grants"]
                                              if g["src"] != ["alice@"]]}))
    try:
        time.sleep(max(0.0, kept["received"] + TTL / 2 + 1 - time.time()))  # due, grant gone
        out = alice("whoami")
        assert out.returncode == 6, out.stderr
        assert "chat-server will not renew your token: the tailnet policy grants " \
               "alice@tailnet.test no access to tsnetchat" in out.stderr
        assert "lasts only as long as the grant it came with" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        lab.write_policy(policy)
        deadline = time.monotonic() + 30  # until WhoIs shows alice's grant again
        while alice("login").returncode != 0:
            assert time.monotonic() < deadline, "alice's grant did not come back"
            time.sleep(1)


# --- the client without the server's dependencies --------------------------------------------


def test_the_client_runs_without_the_servers_dependencies(
        lab: Any, enrolling: LabDaemon, tmp_path: Path) -> None:
    """`pip install tsnetchat` is the client alone; jwt, grpc_health and grpc_reflection
    belong to `tsnetchat[server]`. Here they cannot be imported at all."""
    boot = ("import sys; [sys.modules.__setitem__(m, None) for m in ('jwt', 'grpc_health', "
            "'grpc_reflection')]; sys.argv[0] = 'tsnetchat'; from tsnetchat.cli import main; "
            "main()")
    alice = person(lab, enrolling, "alice-laptop", tmp_path)

    def client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", boot, *args], env=alice.env(),
                              capture_output=True, text=True, timeout=90)

    for cmd in (["login"], ["send", "from a client-only install"], ["whoami"]):
        out = client(cmd[0], "chat-server", *cmd[1:], *alice.args())
        assert out.returncode == 0, out.stderr
    serve = client("serve", "--state-dir", str(tmp_path / "s"))
    assert serve.returncode == 3
    assert "pip install '/path/to/tsnetchat[server]' (your checkout" in serve.stderr
    assert "missing: jwt" in serve.stderr
    doctor = client("doctor")  # (this machine as a server: said, and what a client means)
    assert doctor.returncode == 3
    assert "`tsnetchat doctor --server NAME`" in " ".join(doctor.stderr.split()), doctor.stderr
    assert os.path.exists(alice.store)
