"""Tailscale's API through the `tailscale` package, against the stand-in of its endpoints
(tests/tsapi_standin.py) backed by the lab's real headscale: minted keys are real pre-auth
keys that real tailscaleds join with, and the policy the grants commands edit is the one
headscale enforces, so its effect shows in WhoIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tailnet_lab
from helpers import CLI, free_port, start_daemon
from tsapi_standin import StandIn, running

from tsnetchat.tailnet import LocalAPI

pytestmark = pytest.mark.tailnet

CAP = "example.com/cap/tsnetchat"
# The lab's policy, as an operator keeps it: comments, trailing commas, other sections. alice
# has no tsnetchat grant (the tests add one); bob's stays.
POLICY = """// tsnetchat lab policy, kept by hand
{
  // Everyone reaches everyone.
  "grants": [
    {"src": ["*"], "dst": ["*"], "ip": ["*"]},
    /* bob may chat */
    {"src": ["bob@"], "dst": ["chat@"],
     "app": {"CAP": [{"rooms": ["general", "random"], "admin": false}]}},
  ],
  "tagOwners": {
    "tag:chat": ["chat@"], // the server's tag
  },
}
""".replace("CAP", CAP)


@pytest.fixture
def api(lab: Any, tmp_path: Path) -> Iterator[StandIn]:
    with running(lab, tmp_path) as s:
        yield s


@pytest.fixture
def hand_policy(lab: Any) -> Iterator[str]:
    """The lab runs POLICY for the test; its default policy is back afterwards."""
    lab.write_policy_text(POLICY)
    try:
        yield POLICY
    finally:
        lab.write_policy(tailnet_lab.default_policy())


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TSNETCHAT_CONFIG": "/dev/null", **env})


def alice_caps(lab: Any) -> list[Any]:
    """What WhoIs on the chat-server node reports for alice's tsnetchat capability."""
    async def ask() -> list[Any]:
        api = LocalAPI(lab.nodes["chat-server"].socket)
        try:
            who = await api.whois(lab.nodes["alice-laptop"].ipv4)
        finally:
            await api.aclose()
        return list(who.cap_map.get(CAP, []))

    return asyncio.run(ask())


def wait_for(what: str, check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def forget(lab: Any, *hostnames: str) -> None:
    for n in json.loads(lab.headscale("nodes", "list", "-o", "json")) or []:
        if n["given_name"].startswith(hostnames):
            lab.headscale("nodes", "delete", "-i", str(n["id"]), "--force")


def peer(lab: Any, dns_label: str) -> dict[str, Any] | None:
    st = lab.status(lab.nodes["alice-laptop"])
    return next((p for p in (st.get("Peer") or {}).values()
                 if p["DNSName"].split(".")[0] == dns_label), None)


def kill_with_children(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a server that did not stop, and its embedded tailscaled with it."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    proc.kill()
    proc.wait()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


# --- provisioning ---------------------------------------------------------------------


def test_a_node_joins_with_a_key_minted_through_the_package(
        lab: Any, api: StandIn, tmp_path: Path) -> None:
    keyfile = tmp_path / "authkey"
    out = cli("provision", "--hostname", "chat-minted", "--tags", "tag:chat", "--out",
              str(keyfile), env=api.env())
    assert out.returncode == 0, out.stderr
    assert keyfile.stat().st_mode & 0o777 == 0o600 and out.stdout == ""
    assert "POST /api/v2/oauth/token" in api.calls and "POST /api/v2/tailnet/-/keys" in api.calls
    node = tailnet_lab.Node(name="chat-minted", user="", dir=str(tmp_path / "node"),
                            socket=str(tmp_path / "node" / "ts.sock"),
                            socks5=f"127.0.0.1:{free_port()}",
                            http_proxy=f"127.0.0.1:{free_port()}")
    (tmp_path / "node" / "logs").mkdir(parents=True)
    lab.start_tailscaled(node)
    try:
        lab.tailscale(node, "up", f"--login-server={lab.headscale_url}",
                      f"--auth-key=file:{keyfile}", "--hostname=chat-minted", "--timeout=60s")
        me = lab.status(node)["Self"]
        assert me["Tags"] == ["tag:chat"]  # pre-authorised and tagged, as minted
        assert me["DNSName"].startswith("chat-minted.")
    finally:
        lab.kill_tailscaled(node)
        forget(lab, "chat-minted")


def test_provision_says_once_that_an_online_device_holds_the_name(
        api: StandIn, tmp_path: Path) -> None:
    """Each device that held the name was said twice: the command's own line, and the
    library's warning, which Python's logging printed bare without a handler (an operator's
    run, 2026-11-25)."""
    keyfile = tmp_path / "authkey"
    out = cli("provision", "--hostname", "chat-server", "--tags", "tag:chat", "--out",
              str(keyfile), env=api.env())
    assert out.returncode == 0, out.stderr
    said = out.stderr.splitlines()
    assert said[-1] == f"wrote a single-use auth key for chat-server to {keyfile}"
    assert len(said) == 2 and said[0].startswith(
        "the device chat-server.tailnet.test (id "), out.stderr
    assert "not removed because it is online" in said[0]


def test_serve_embedded_mints_its_key_and_clears_its_name_on_a_fresh_state_dir(
        lab: Any, api: StandIn, tmp_path: Path) -> None:
    """First start: no auth key anywhere, the server mints one. Its state dir is then lost;
    the next start finds the old, offline device holding the name and removes it, so the
    new node is chat-prov again. With stale_device = report, it only says so."""
    port = free_port()

    def serve(state: str, **env: str) -> tuple[subprocess.Popen[str], Path]:
        log = tmp_path / f"{state}.log"
        proc = subprocess.Popen(
            [CLI, "serve", "--embedded", "--state-dir", str(tmp_path / state), "--hostname",
             "chat-prov", "--login-server", lab.headscale_url, "--tailscaled-path",
             str(lab.bin.tailscaled), "--port", str(port)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,  # noqa: SIM115
            env={**lab.node_env(tmp_path), "TSNETCHAT_CONFIG": "/dev/null",
                 "TSNETCHAT_TAGS": "tag:chat", **api.env(), **env})
        procs.append(proc)
        return proc, log

    def ready(proc: subprocess.Popen[str], log: Path) -> str:
        deadline = time.monotonic() + 90
        while "ready: MagicDNS name" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        return log.read_text()

    procs: list[subprocess.Popen[str]] = []

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)  # the server stops its tailscaled, then exits
        assert proc.wait(timeout=30) == 0

    (tmp_path / "logs").mkdir()
    try:
        first, log1 = serve("state-1")
        text = ready(first, log1)
        assert "minted a single-use, pre-authorised auth key for chat-prov" in text
        assert "MagicDNS name chat-prov.tailnet.test" in text
        old = wait_for("chat-prov online for alice", lambda: peer(lab, "chat-prov"))
        stop(first)  # its state dir is "lost" below
        wait_for("the old chat-prov offline",
                 lambda: (p := peer(lab, "chat-prov")) and not p["Online"], timeout=60)

        second, log2 = serve("state-2")
        text = ready(second, log2)
        assert re.search(r"removed the stale device chat-prov\.tailnet\.test \(id \d+, offline",
                         text), text
        assert "MagicDNS name chat-prov.tailnet.test" in text  # the name, not chat-prov-1
        new = wait_for("the new chat-prov online",
                       lambda: (p := peer(lab, "chat-prov")) and p["ID"] != old["ID"] and p)
        assert new["Online"]
        stop(second)
        wait_for("the new chat-prov offline",
                 lambda: (p := peer(lab, "chat-prov")) and not p["Online"], timeout=60)

        third, log3 = serve("state-3", TSNETCHAT_STALE_DEVICE="report")
        text = ready(third, log3)
        assert re.search(r"the device chat-prov\.tailnet\.test \(id \d+, offline.*still holds "
                         r"the name chat-prov.*not removed because stale_device is report",
                         text), text
        assert not re.search(r"MagicDNS name chat-prov\.tailnet\.test", text)
        stop(third)
        for log in (log1, log2, log3):
            assert api.tokens and not any(t in log.read_text() for t in api.tokens)
            assert "hskey-auth-" not in log.read_text()  # the minted keys never reach the log
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_with_children(proc)
        forget(lab, "chat-prov")


# --- grants ---------------------------------------------------------------------------


def test_grants_added_through_the_cli_change_what_whois_reports_for_alice(
        lab: Any, api: StandIn, hand_policy: str) -> None:
    wait_for("alice without a grant", lambda: alice_caps(lab) == [])
    added = cli("grants", "add", "--src", "alice@", "--dst", "chat@", "--room", "ops",
                "--admin", env=api.env())
    assert added.returncode == 0, added.stderr
    assert wait_for("alice's new grant in WhoIs", lambda: alice_caps(lab)) == [
        {"rooms": ["ops"], "admin": True}]
    assert "POST /api/v2/tailnet/-/acl/validate" in api.calls  # validated before saving
    # The rest of the file is as it was, comments included: only one line is new.
    saved = lab.policy_path.read_text()
    new_lines = [ln for ln in saved.splitlines() if ln not in hand_policy.splitlines()]
    assert len(new_lines) == 1 and '"src": ["alice@"]' in new_lines[0]
    assert saved.replace(new_lines[0] + "\n", "") == hand_policy

    shown = cli("grants", "show", "--json", env=api.env())
    grants = json.loads(shown.stdout)
    assert [(g["src"], g["values"]) for g in grants] == [
        (["bob@"], [{"rooms": ["general", "random"], "admin": False}]),
        (["alice@"], [{"rooms": ["ops"], "admin": True}])]
    removed = cli("grants", "remove", grants[1]["id"], env=api.env())
    assert removed.returncode == 0, removed.stderr
    wait_for("alice's grant gone from WhoIs", lambda: alice_caps(lab) == [])
    assert lab.policy_path.read_text() == hand_policy  # byte for byte


def test_a_concurrent_edit_is_refused_not_overwritten(
        lab: Any, api: StandIn, hand_policy: str) -> None:
    theirs = hand_policy.replace("/* bob may chat */", "/* bob may chat (edited meanwhile) */")
    # Another admin saves between our read and our save.
    api.before_save = lambda: lab.write_policy_text(theirs)
    out = cli("grants", "add", "--src", "alice@", "--dst", "chat@", "--room", "ops",
              env=api.env())
    assert out.returncode == 4, out.stdout + out.stderr
    assert "changed since it was read" in out.stderr and "nothing was saved" in out.stderr
    assert "Traceback" not in out.stderr
    assert lab.policy_path.read_text() == theirs  # their edit stands; ours was not written
    assert alice_caps(lab) == []


def test_grants_add_refuses_what_the_api_does_not_validate(
        lab: Any, api: StandIn, hand_policy: str) -> None:
    out = cli("grants", "add", "--src", "group:nosuch", "--dst", "chat@", env=api.env())
    assert out.returncode == 2, out.stderr
    assert "refused the edited policy file, so nothing was saved" in out.stderr
    assert "group:nosuch" in out.stderr
    assert "POST /api/v2/tailnet/-/acl" not in api.calls
    assert lab.policy_path.read_text() == hand_policy


def test_wrong_credentials_are_a_clear_error(api: StandIn) -> None:
    env = {**api.env(), "TSNETCHAT_OAUTH_CLIENT_SECRET": "tskey-client-wrong"}
    out = cli("grants", "show", env=env)
    assert out.returncode == 4 and "Traceback" not in out.stderr
    assert "check oauth_client_id and its secret" in out.stderr
    assert "tskey-client-wrong" not in out.stderr


# --- doctor --api ---------------------------------------------------------------------


def test_doctor_api_reports_the_server_device_and_who_may_reach_it(
        lab: Any, api: StandIn, tmp_path: Path) -> None:
    d = start_daemon(lab, tmp_path)
    try:
        d.wait_for("READY=1")
        out = cli("doctor", "--api", "--socket", lab.nodes["chat-server"].socket,
                  "--state-dir", str(d.state), "--port", str(d.port), env=api.env(oauth=False))
        lines = out.stdout
        assert re.search(r"✔ API: device authorised\s+chat-server\.tailnet\.test \(id \d+\) is "
                         r"authorised", lines), lines
        assert re.search(r"✔ API: key expiry\s+key expiry is disabled", lines), lines
        # chat-server belongs to the user chat: a warning with what to do.
        assert re.search(r"! API: tags\s+untagged: the server belongs to chat@tailnet\.test",
                         lines), lines
        m = re.search(r"✔ API: who may connect\s+the policy lets (.*) reach "
                      rf"{re.escape(lab.nodes['chat-server'].ipv4)}:{d.port}; 2 tsnetchat "
                      r"grant\(s\)", lines)
        assert m, lines
        assert {"alice@tailnet.test", "bob@tailnet.test", "mallory@tailnet.test"} <= set(
            m.group(1).split(", "))
        assert out.returncode == 0, lines
    finally:
        d.proc.terminate()
        d.proc.wait(timeout=15)
        d.notify.close()
