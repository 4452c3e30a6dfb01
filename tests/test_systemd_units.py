"""Both shipped units under a real systemd (PID 1 in a container, tests/nspawn.py), as an
operator runs them: tsnetchat installed into a venv the way the README says, the unit from
`tsnetchat install-systemd` with all its hardening, a client on the lab's alice-laptop
reaching the server over the tailnet.

* ``tsnetchat.service`` uses the machine's tailscaled.service, joined to the lab as the user
  chat (hostname chat-vm);
* ``tsnetchat-embedded.service`` runs its own tailscaled, which joins the lab as
  chat-vm-embedded with the auth key the unit hands it as the credential ``authkey``.

The one change to the shipped units is a drop-in that shortens WatchdogSec= (30 s) to 4 s,
so a hang is caught in seconds; the embedded unit's drop-in also passes the lab's TS_*
knobs to its tailscaled (no contact with anything public).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from helpers import free_port, lab_connect, need
from nspawn import (
    LAB_KNOBS,
    PKG,
    Container,
    forget_node,
    join_system_tailscaled,
    lab_machine,
    missing,
)

from tsnetchat.client import Connection

pytestmark = [pytest.mark.systemd, pytest.mark.tailnet]

VENV = "/opt/tsnetchat"
CLI = f"{VENV}/bin/tsnetchat"
WATCHDOG = "4s"


@dataclass
class Unit:
    c: Container
    lab: Any
    name: str  # tsnetchat.service or tsnetchat-embedded.service
    hostname: str
    port: int
    token: str = ""

    @property
    def embedded(self) -> bool:
        return "embedded" in self.name

    def show(self, *props: str) -> dict[str, str]:
        return self.c.show(self.name, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def ensure_running(self) -> None:
        if self.show("ActiveState")["ActiveState"] != "active":
            self.c.sh(f"systemctl start {self.name}")

    def wait_restarted(self, restarts_before: int, old_pid: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            p = self.show("NRestarts", "ActiveState", "MainPID")
            if (int(p["NRestarts"]) > restarts_before and p["ActiveState"] == "active"
                    and int(p["MainPID"]) not in (0, old_pid)):
                return
            assert time.monotonic() < deadline, f"not restarted: {p}\n{self.journal()[-3000:]}"
            time.sleep(0.25)

    def journal(self, *args: str) -> str:
        return self.c.sh(f"journalctl -u {self.name} --no-pager -o cat {' '.join(args)}").stdout

    async def connect(self, node: str = "alice-laptop") -> Connection:
        return await lab_connect(self.lab, node, self.hostname, self.port, self.token)

    def set_config(self, **values: Any) -> None:
        lines = [f"port = {self.port}"]
        if self.embedded:
            lines += [f'hostname = "{self.hostname}"',
                      f'login_server = "{self.lab.headscale_url}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        self.c.write("/etc/tsnetchat/config.toml", "\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def vm(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    why = missing()
    if why:
        need("a container with systemd as PID 1", why)
    with lab_machine(lab, tmp_path_factory.mktemp("vm-units")) as c:
        try:
            join_system_tailscaled(c, lab, "chat-vm")
            # The README's install: a venv outside any home.
            c.sh(f"python3 -m venv {VENV} && {VENV}/bin/pip install -q {PKG}")
            yield c
        finally:
            forget_node(lab, "chat-vm")
            forget_node(lab, "chat-vm-embedded")


@pytest.fixture(scope="module", params=["tsnetchat.service", "tsnetchat-embedded.service"])
def unit(request: pytest.FixtureRequest, vm: Container, lab: Any) -> Iterator[Unit]:
    name = request.param
    embedded = "embedded" in name
    u = Unit(vm, lab, name, "chat-vm-embedded" if embedded else "chat-vm", free_port())
    u.set_config()
    vm.sh(f"{CLI} install-systemd" + (" --embedded" if embedded else ""))
    dropin = f"[Service]\nWatchdogSec={WATCHDOG}\n"
    if embedded:
        # The key only as a file root may read, which the unit hands over as a credential.
        vm.write("/etc/tsnetchat/authkey", lab.auth_key("chat"), mode=0o600)
        dropin += f"Environment={LAB_KNOBS}\n"
    vm.write(f"/etc/systemd/system/{name}.d/test.conf", dropin)
    try:
        vm.sh(f"systemctl daemon-reload && systemctl enable --now {name}")
        # The README's next step: issue tokens once the service has made its state dir.
        u.token = vm.sh(f"{CLI} token issue alice@tailnet.test").stdout.strip()
        yield u
    finally:
        vm.sh(f"systemctl disable --now {name}; systemctl reset-failed", check=False)


def test_start_returns_once_the_server_listens_and_says_where(unit: Unit) -> None:
    unit.ensure_running()
    unit.c.sh(f"systemctl restart {unit.name}")
    # Type=notify: `systemctl restart` returned, so READY=1 came, and by then it listens.
    with socket.create_connection(("127.0.0.1", unit.port), timeout=2):
        pass
    p = unit.show("ActiveState", "SubState", "StatusText")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running")
    assert p["StatusText"] == (f"serving on 127.0.0.1:{unit.port} as "
                               f"{unit.hostname}.tailnet.test")


def chat_works(unit: Unit) -> None:
    """alice, on her lab node, sends through the unit's server and reads it back."""
    async def scenario() -> tuple[int, list[str]]:
        conn = await unit.connect()
        try:
            mid = await conn.send_one("general", f"hello through {unit.name}")
            page = await conn.history("general", limit=5)
            return mid, [f"{m.sender.login}: {m.text}" for m in page.messages]
        finally:
            await conn.close()

    mid, lines = asyncio.run(scenario())
    assert mid > 0 and f"alice@tailnet.test: hello through {unit.name}" in lines


def test_chat_works_through_the_unit_from_a_lab_node(unit: Unit) -> None:
    unit.ensure_running()
    chat_works(unit)


def test_reload_applies_a_changed_limit_without_a_restart(unit: Unit) -> None:
    unit.ensure_running()
    pid = unit.main_pid()

    async def send(text: str) -> grpc.StatusCode:
        conn = await unit.connect()
        try:
            await conn.send_one("general", text)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()
        finally:
            await conn.close()

    text = "a message of more than ten bytes"
    assert asyncio.run(send(text)) == grpc.StatusCode.OK
    unit.set_config(max_message_bytes=10)
    try:
        unit.c.sh(f"systemctl reload {unit.name}")
        deadline = time.monotonic() + 10  # ExecReload= only sends SIGHUP; it applies soon after
        while (code := asyncio.run(send(text))) == grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the new limit never applied"
            time.sleep(0.2)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert unit.main_pid() == pid  # reloaded, not restarted
        assert "reloaded configuration; reading revocations" in unit.journal()
    finally:
        unit.set_config()
        unit.c.sh(f"systemctl reload {unit.name}")


def test_the_watchdog_restarts_a_hung_server(unit: Unit) -> None:
    unit.ensure_running()
    before = int(unit.show("NRestarts")["NRestarts"])
    pid = unit.main_pid()
    unit.c.sh(f"kill -STOP {pid}")  # hung: alive, but its event loop no longer runs
    unit.wait_restarted(before, pid)
    log = unit.journal()
    assert f"Watchdog timeout (limit {WATCHDOG})" in log
    assert "Failed with result 'watchdog'" in log
    chat_works(unit)


def test_restart_brings_back_a_killed_server(unit: Unit) -> None:
    unit.ensure_running()
    before = int(unit.show("NRestarts")["NRestarts"])
    pid = unit.main_pid()
    unit.c.sh(f"kill -KILL {pid}")
    unit.wait_restarted(before, pid)
    assert "Main process exited, code=killed, status=9/KILL" in unit.journal()
    chat_works(unit)


def test_stop_drains_open_streams_and_exits_cleanly(unit: Unit) -> None:
    unit.ensure_running()

    async def scenario() -> tuple[grpc.StatusCode | None, str, str]:
        conn = await unit.connect()
        call = conn.subscribe("general")
        async for ev in call:
            if ev.WhichOneof("event") == "replay_done":
                break
        stopping = asyncio.create_task(asyncio.to_thread(
            unit.c.sh, f"systemctl stop {unit.name}"))
        reason, code, details = "", None, ""
        try:
            async for ev in call:
                if ev.WhichOneof("event") == "going_away":
                    reason = ev.going_away.reason
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
        await stopping
        await conn.close()
        return code, reason, details

    code, reason, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE and "restarting" in reason
    # The server's own closing status reached the client (the embedded unit's tailscaled
    # lives until the drain is done), not a transport failure after a keepalive timeout.
    assert "reconnect and resume after your last message id" in details, details
    p = unit.show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert p["ActiveState"] == "inactive" and p["Result"] == "success"
    assert p["ExecMainCode"] == "1" and p["ExecMainStatus"] == "0"  # exited 0, not killed
    assert "shutting down: told 1 stream(s) to reconnect" in unit.journal()
    unit.ensure_running()


def test_the_journal_shows_the_servers_lines_with_their_priority(unit: Unit) -> None:
    unit.ensure_running()
    entries = [json.loads(line) for line in unit.c.sh(
        f"journalctl -u {unit.name} --no-pager -o json _PID={unit.main_pid()}"
    ).stdout.splitlines()]
    serving = [e for e in entries if str(e.get("MESSAGE", "")).startswith(
        "info tsnetchat.server: serving on")]
    assert serving, entries
    # The <6> prefix became the entry's priority instead of staying in the text.
    assert serving[0]["PRIORITY"] == "6" and serving[0]["SYSLOG_IDENTIFIER"] == "tsnetchat"
    assert unit.token not in unit.journal()


def test_the_shipped_hardening_is_in_force(unit: Unit) -> None:
    unit.ensure_running()
    # The unit is what install-systemd wrote, plus only the test's drop-in.
    cat = unit.c.sh(f"systemctl cat {unit.name}").stdout
    dropin = cat.split(f"# /etc/systemd/system/{unit.name}.d/test.conf\n", 1)[1]
    keys = {line.split("=", 1)[0] for line in dropin.splitlines() if "=" in line}
    assert keys <= {"WatchdogSec", "Environment"}
    p = unit.show("DynamicUser", "NoNewPrivileges", "ProtectSystem", "ProtectHome",
                  "PrivateTmp", "PrivateDevices", "RestrictRealtime", "MemoryDenyWriteExecute",
                  "CapabilityBoundingSet", "RestrictAddressFamilies", "SystemCallFilter")
    assert p["DynamicUser"] == "yes" and p["NoNewPrivileges"] == "yes"
    assert p["ProtectSystem"] == "strict" and p["ProtectHome"] == "yes"
    assert p["PrivateTmp"] == p["PrivateDevices"] == p["RestrictRealtime"] == "yes"
    assert p["MemoryDenyWriteExecute"] == "yes" and p["CapabilityBoundingSet"] == ""
    assert set(p["RestrictAddressFamilies"].split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert p["SystemCallFilter"]
    # ...and the kernel holds the running server to it.
    status = unit.c.read(f"/proc/{unit.main_pid()}/status")
    fields = dict(re.findall(r"^(\w+):\s*(.*)$", status, re.M))
    assert fields["Uid"].split()[0] != "0" and fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2" and int(fields["CapEff"], 16) == 0


@pytest.mark.parametrize("unit", ["tsnetchat.service"], indirect=True)
def test_an_operator_without_sudo_is_told_to_use_it_and_nothing_is_made_in_their_home(
        unit: Unit) -> None:
    """The README's "without sudo it checks what it can" was not so: doctor checked
    ~/.local/state/tsnetchat and said another program held the server's port, `token list`
    and `backup` said there was no history, and `token issue` made a key there (an
    operator's run in this container, 2026-11-25)."""
    unit.ensure_running()
    unit.c.sh("id ops >/dev/null 2>&1 || useradd --create-home --shell /bin/sh ops")
    doctor = unit.c.sh(f"{CLI} doctor", user="ops", check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert re.search(r"! listening +something answers on 127\.0\.0\.1:\d+; whether it is this "
                     r"state dir's server is not checked: /var/lib/tsnetchat is readable only "
                     r"by the server's user; run `sudo tsnetchat doctor`", doctor.stdout), (
        doctor.stdout)
    for args in ("token list", "token issue bob@tailnet.test", "backup /tmp/b.db"):
        out = unit.c.sh(f"{CLI} {args}", user="ops", check=False)
        assert out.returncode == 3, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("error: permission denied: /var/lib/tsnetchat") and (
            "try again with sudo" in out.stderr), (args, out.stderr)
    assert unit.c.sh("ls -A /home/ops/.local/state /tmp/b.db 2>/dev/null; true",
                     user="ops").stdout == ""


@pytest.mark.parametrize("unit", ["tsnetchat-embedded.service"], indirect=True)
def test_doctor_embedded_checks_the_embedded_units_own_tailscaled(unit: Unit) -> None:
    """The unit runs `serve --embedded`, a flag no config holds: `sudo tsnetchat doctor`
    checked the machine's tailscaled instead (or said none ran), and had no flag to be told
    (an operator's run in this container, 2026-11-25)."""
    unit.ensure_running()
    out = unit.c.sh(f"{CLI} doctor --embedded", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"✔ tailscaled reachable +LocalAPI answers at "
                     r"/var/lib/tsnetchat/tailscaled/tailscaled\.sock", out.stdout), out.stdout
    assert re.search(rf"✔ MagicDNS name +{unit.hostname}\.tailnet\.test", out.stdout), out.stdout
    assert re.search(r"✔ listening +a server answers on 127\.0\.0\.1:", out.stdout), out.stdout


@pytest.mark.parametrize("unit", ["tsnetchat-embedded.service"], indirect=True)
def test_the_embedded_unit_joins_with_the_auth_key_credential(unit: Unit) -> None:
    unit.ensure_running()
    assert "auth_key" not in unit.c.read("/etc/tsnetchat/config.toml")  # no other source
    assert unit.c.sh("stat -c %a /etc/tsnetchat/authkey").stdout.strip() == "600"
    assert "LoadCredential=authkey:/etc/tsnetchat/authkey" in unit.c.sh(
        f"systemctl cat {unit.name}").stdout
    st = unit.lab.status(unit.lab.nodes["alice-laptop"])
    peer = next(p for p in st["Peer"].values() if p["HostName"] == unit.hostname)
    assert peer["Online"] and st["User"][str(peer["UserID"])]["LoginName"] == "chat@tailnet.test"
    key = unit.c.read("/etc/tsnetchat/authkey")
    assert key not in unit.journal()


def test_a_token_issued_while_the_service_is_stopped_works_once_it_runs(unit: Unit) -> None:
    """`sudo tsnetchat token issue` writes to the service's state as root; the service, which
    runs as its own (dynamic) user, must still open everything afterwards."""
    unit.ensure_running()
    unit.c.sh(f"systemctl stop {unit.name}")
    token = unit.c.sh(f"{CLI} token issue bob@tailnet.test").stdout.strip()
    unit.c.sh(f"systemctl start {unit.name}")
    owners = unit.c.sh("stat -c '%U %n' /var/lib/private/tsnetchat/*").stdout
    assert "root" not in owners, owners

    async def whoami() -> str:
        conn = await lab_connect(unit.lab, "bob-laptop", unit.hostname, unit.port, token)
        try:
            return (await conn.whoami()).identity.login
        finally:
            await conn.close()

    assert asyncio.run(whoami()) == "bob@tailnet.test"
    chat_works(unit)


def test_a_key_rotated_with_sudo_while_the_service_runs_is_its_own_and_revocations_go_on(
        unit: Unit) -> None:
    """`sudo tsnetchat token rotate-key` wrote a key only root could read: the service kept
    the old key (old tokens went on working), and its once-a-second check of revocations
    ended with it, so later `token revoke`s did nothing (an operator's run, 2026-11-23)."""
    unit.ensure_running()

    async def whoami(token: str) -> grpc.StatusCode:
        conn = await unit.connect()
        conn.metadata = (("authorization", f"Bearer {token}"),)
        try:
            await conn.whoami()
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()
        finally:
            await conn.close()

    def until_refused(token: str) -> None:
        deadline = time.monotonic() + 15
        while asyncio.run(whoami(token)) == grpc.StatusCode.OK:
            assert time.monotonic() < deadline, f"still accepted\n{unit.journal()[-3000:]}"
            time.sleep(0.5)

    old = unit.token
    assert asyncio.run(whoami(old)) == grpc.StatusCode.OK
    unit.c.sh(f"{CLI} token rotate-key")
    owner = unit.c.sh("stat -c %U /var/lib/private/tsnetchat/jwt.key").stdout.strip()
    assert owner != "root"
    until_refused(old)
    unit.token = unit.c.sh(f"{CLI} token issue alice@tailnet.test").stdout.strip()
    assert asyncio.run(whoami(unit.token)) == grpc.StatusCode.OK
    doomed = unit.c.sh(f"{CLI} token issue alice@tailnet.test --json").stdout
    doomed_token, doomed_id = json.loads(doomed)["token"], json.loads(doomed)["id"]
    assert asyncio.run(whoami(doomed_token)) == grpc.StatusCode.OK
    unit.c.sh(f"{CLI} token revoke {doomed_id}")
    until_refused(doomed_token)
    assert "cannot be read" not in unit.journal()


def test_a_backup_taken_while_the_unit_runs_restores_under_it_once_stopped(unit: Unit) -> None:
    """README, Operations, steps 7 and 8 as written, under DynamicUser= (the state dir is
    /var/lib/private/tsnetchat behind a link): the restored history is the service's own and
    holds what the backup did."""
    unit.ensure_running()
    chat_works(unit)

    async def send(text: str) -> None:
        conn = await unit.connect()
        try:
            await conn.send_one("general", text)
        finally:
            await conn.close()

    # (one line each side of the backup: a restore that left an empty history passed when
    # only the later one was looked for; a review, 2026-11-25)
    before = f"before the backup {time.time_ns()}"
    asyncio.run(send(before))
    backup = "/var/backups/tsnetchat.db"
    out = unit.c.sh(f"{CLI} backup --state-dir /var/lib/tsnetchat {backup}").stdout
    assert out.startswith("backed up ") and backup in out
    asyncio.run(send("after the backup"))
    unit.c.sh(f"systemctl stop {unit.name}")
    out = unit.c.sh(f"{CLI} restore --state-dir /var/lib/tsnetchat {backup}").stdout
    assert out.startswith("restored ") and "the history it replaced is kept as" in out
    unit.c.sh(f"systemctl start {unit.name}")
    owners = unit.c.sh("stat -c '%U %n' /var/lib/private/tsnetchat/*").stdout
    assert "root" not in owners, owners
    assert unit.c.sh("ls -a /var/lib/private").stdout.split() == [".", "..", "tsnetchat"]

    async def texts() -> list[str]:
        conn = await unit.connect()
        try:
            return [m.text for m in (await conn.history("general", limit=50)).messages]
        finally:
            await conn.close()

    restored = asyncio.run(texts())
    assert before in restored and "after the backup" not in restored, restored
    chat_works(unit)


def test_a_reload_with_a_mistyped_key_keeps_the_running_config_and_says_why(
        unit: Unit) -> None:
    unit.ensure_running()
    pid = unit.main_pid()
    unit.c.write("/etc/tsnetchat/config.toml",
                 unit.c.read("/etc/tsnetchat/config.toml") + "rate_brust = 1\n")
    try:
        unit.c.sh(f"systemctl reload {unit.name}")
        deadline = time.monotonic() + 10
        while "reload refused, keeping the old config" not in (log := unit.journal()):
            assert time.monotonic() < deadline, log[-2000:]
            time.sleep(0.2)
        assert "unknown key 'rate_brust': did you mean 'rate_burst'?" in log
        assert unit.main_pid() == pid and unit.show("ActiveState")["ActiveState"] == "active"
        chat_works(unit)
    finally:
        unit.set_config()
        unit.c.sh(f"systemctl reload {unit.name}")
