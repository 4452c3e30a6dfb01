"""`tsnetchat install-systemd` for every install method the README documents, on a real
systemd (tests/nspawn.py): the unit it writes starts and serves, or it refuses and says how
to install instead. Before the fix, a venv or pipx install under /root or /home failed with
203/EXEC: the units hide homes (ProtectHome=yes) from the service.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import free_port, need
from nspawn import PKG, Container, forget_node, join_system_tailscaled, lab_machine, missing

pytestmark = [pytest.mark.systemd, pytest.mark.tailnet]

HOSTNAME = "chat-vm-install"


@pytest.fixture(scope="module")
def vm(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Container, int]]:
    why = missing()
    if why:
        need("a container with systemd as PID 1", why)
    port = free_port()
    with lab_machine(lab, tmp_path_factory.mktemp("vm-install")) as c:
        try:
            join_system_tailscaled(c, lab, HOSTNAME)
            c.write("/etc/tsnetchat/config.toml", f"port = {port}\n")
            # An ordinary user, home made the way Debian's useradd makes it (mode 0700).
            c.sh("useradd --create-home --shell /bin/sh ops && chmod 0700 /home/ops")
            yield c, port
        finally:
            forget_node(lab, HOSTNAME)


# (name, install commands run as (user, script), the tsnetchat that runs install-systemd,
#  where ExecStart must point)
METHODS = {
    "venv in /opt": (
        [("root", f"python3 -m venv /opt/tsnetchat && /opt/tsnetchat/bin/pip install -q {PKG} "
                  "&& ln -s /opt/tsnetchat/bin/tsnetchat /usr/local/bin/tsnetchat")],
        "tsnetchat", "/opt/tsnetchat/bin/tsnetchat"),
    "pipx as root (in /root)": (
        [("root", f"pipx install {PKG}")],
        "/root/.local/bin/tsnetchat", "/root/.local/pipx/venvs/tsnetchat/bin/tsnetchat"),
    "pipx into /opt/pipx": (
        [("root", f"PIPX_HOME=/opt/pipx PIPX_BIN_DIR=/usr/local/bin pipx install {PKG}")],
        "tsnetchat", "/opt/pipx/venvs/tsnetchat/bin/tsnetchat"),
    "venv in a user's home (0700)": (
        [("ops", f"python3 -m venv ~/venv && ~/venv/bin/pip install -q {PKG}")],
        "/home/ops/venv/bin/tsnetchat", "/home/ops/venv/bin/tsnetchat"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_the_installed_unit_starts_and_serves_for_each_documented_install_method(
        vm: tuple[Container, int], method: str) -> None:
    c, port = vm
    steps, cli, exe = METHODS[method]
    for user, script in steps:
        c.sh(script, user=user)
    out = c.sh(f"{cli} install-systemd")
    assert "installed /etc/systemd/system/tsnetchat.service" in out.stdout
    unit = c.read("/etc/systemd/system/tsnetchat.service")
    assert f"ExecStart={exe} serve\n" in unit
    try:
        c.sh("systemctl daemon-reload && systemctl start tsnetchat.service")
        # Type=notify: start returned, so the server said READY, and it listens by then.
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        props = c.show("tsnetchat.service", "ActiveState", "StatusText", "ExecMainStatus")
        assert props["ActiveState"] == "active"
        assert props["StatusText"] == f"serving on 127.0.0.1:{port} as {HOSTNAME}.tailnet.test"
        if exe.startswith(("/root", "/home")):
            # The homes stay hidden; only the installation is shown, read-only.
            assert "ProtectHome=tmpfs\n" in unit and "BindReadOnlyPaths=" in unit
            pid = c.show("tsnetchat.service", "MainPID")["MainPID"]
            seen = c.sh(f"nsenter -t {pid} -m ls -A /root /home/ops 2>&1", check=False).stdout
            assert ".bashrc" not in seen and ".profile" not in seen, seen
        else:
            assert "ProtectHome=yes\n" in unit
    finally:
        c.sh("systemctl stop tsnetchat.service; rm -f /etc/systemd/system/tsnetchat.service; "
             "systemctl daemon-reload; systemctl reset-failed; rm -f /usr/local/bin/tsnetchat",
             check=False)


def test_pip_install_user_is_refused_with_the_fix(vm: tuple[Container, int]) -> None:
    c, _ = vm
    # Debian's Python refuses --user installs (PEP 668) unless told; some people do tell it.
    c.sh(f"pip install -q --user --break-system-packages {PKG}", user="ops")
    out = c.sh("~/.local/bin/tsnetchat install-systemd --dest /tmp/units", user="ops",
               check=False)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "pip install --user" in out.stderr and "python3 -m venv /opt/tsnetchat" in out.stderr
    assert c.sh("ls /tmp/units 2>/dev/null || true", user="ops").stdout == ""


def test_an_installation_other_users_cannot_read_is_refused_with_the_fix(
        vm: tuple[Container, int]) -> None:
    c, _ = vm
    c.sh(f"umask 077 && python3 -m venv ~/private && ~/private/bin/pip install -q {PKG}",
         user="ops")
    out = c.sh("/home/ops/private/bin/tsnetchat install-systemd --dest /tmp/units",
               check=False)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "may not read /home/ops/private" in out.stderr and "chmod -R o+rX" in out.stderr
    assert c.sh("test -e /tmp/units/tsnetchat.service", check=False).returncode != 0
