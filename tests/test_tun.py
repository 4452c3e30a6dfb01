"""TUN mode: the server listens on exactly the node's tailnet addresses, nowhere else.

A kernel-TUN tailscaled runs in a network namespace this test creates (veth to the host,
a link-local /30 checked to be unused on the host), joined to the lab's headscale through two small
forwarders so that `http://127.0.0.1:<port>` means the same inside and outside. Then
`tsnetchat serve` runs inside the namespace and alice reaches it over the tailnet.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import TunNode, free_port, sh, start_daemon, tun_node

from tsnetchat.client import connect

pytestmark = pytest.mark.tailnet

CLI = str(Path(sys.executable).with_name("tsnetchat"))


@pytest.fixture(scope="module", name="tun_node")
def tun_server_node(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunNode]:
    with tun_node(lab, tmp_path_factory.mktemp("tun"), user="chat", hostname="chat-tun",
                  tag=f"{os.getpid() % 100000}") as node:
        yield node


def test_tun_server_listens_only_on_the_tailnet_addresses(lab: Any, tun_node: TunNode,
                                                         tmp_path: Path) -> None:
    st = tun_node.status(str(lab.bin.tailscale))
    assert st["TUN"] is True
    ips = set(st["Self"]["TailscaleIPs"])
    port = free_port()
    with tun_node.serve(tmp_path, port):
        out = sh(*tun_node.exec("ss", "-ltnH", f"sport = :{port}")).stdout
        # gRPC binds an IPv4 address as v4-mapped on a v6 socket ([::ffff:100.64.0.5]).
        bound = {line.split()[3].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
                 for line in out.splitlines()}
        assert bound == ips, (bound, ips)
        assert not bound & {"0.0.0.0", "::", "*", "127.0.0.1", "::1"}
        tok = sh(CLI, "token", "issue", "alice@tailnet.test", "--state-dir",
                 str(tmp_path / "state")).stdout.strip()
        alice = lab.nodes["alice-laptop"]

        async def reach() -> str:
            deadline = time.monotonic() + 60
            while True:
                conn = await connect("chat-tun", tok, socket=alice.socket, port=port,
                                     proxy=f"http://{alice.http_proxy}")
                try:
                    me = await conn.whoami(timeout=5)
                    return me.identity.login
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1)
                finally:
                    await conn.close()

        # Over the tailnet to the TUN node: WhoIs sees alice's real tailnet source address.
        assert asyncio.run(reach()) == "alice@tailnet.test"


def _listening(node: TunNode, port: int) -> set[str]:
    out = sh(*node.exec("ss", "-ltnH", f"sport = :{port}")).stdout
    return {line.split()[3].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
            for line in out.splitlines()}


def test_server_follows_a_changed_tailnet_address(lab: Any, tun_node: TunNode,
                                                  tmp_path: Path) -> None:
    """The node is deleted in headscale and registered again (it gets the next free
    address); the running server notices on the IPN bus and listens on the new addresses."""
    import json

    def ips() -> set[str]:
        st = json.loads(sh(str(lab.bin.tailscale), f"--socket={tun_node.socket}", "status",
                           "--json").stdout)
        return set(st["Self"].get("TailscaleIPs") or ()) if st["BackendState"] == "Running" \
            else set()

    before = ips()
    port = free_port()
    server = subprocess.Popen(
        tun_node.exec(CLI, "serve", "--state-dir", str(tmp_path / "state"), "--socket",
                      tun_node.socket, "--port", str(port)),
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        deadline = time.monotonic() + 30
        while _listening(tun_node, port) != before:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        nodes = json.loads(lab.headscale("nodes", "list", "-o", "json"))
        node_id = next(n["id"] for n in nodes
                       if "chat-tun" in (n.get("given_name"), n.get("givenName"), n.get("name")))
        lab.headscale("nodes", "delete", "-i", str(node_id), "--force")
        up = subprocess.run(
            tun_node.exec(str(lab.bin.tailscale), f"--socket={tun_node.socket}", "up",
                          f"--login-server={lab.headscale_url}",
                          f"--auth-key={lab.auth_key('chat')}", "--hostname=chat-tun",
                          "--accept-dns=false", "--netfilter-mode=off", "--force-reauth",
                          "--timeout=60s"),
            env=lab.node_env(tun_node.dir), capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
        after = ips()
        assert after and after != before
        deadline = time.monotonic() + 30
        while _listening(tun_node, port) != after:
            assert time.monotonic() < deadline, (
                f"still {_listening(tun_node, port)}, want {after}\n"
                + (tmp_path / "serve.log").read_text()[-2000:])
            time.sleep(0.2)
        assert "tailnet addresses changed" in (tmp_path / "serve.log").read_text()
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_client_on_a_tun_node_dials_the_server_directly(lab: Any, tun_node: TunNode,
                                                        tmp_path: Path) -> None:
    """No proxy, no LocalAPI dial: the client sees TUN, dials chat-server's tailnet IP, and
    the kernel routes it through tailscale. The server identifies the TUN node's user."""
    d = start_daemon(lab, tmp_path)
    try:
        d.wait_for("READY=1")
        tok = d.token("chat@tailnet.test")  # the TUN node was registered as user chat
        out = subprocess.run(tun_node.exec(CLI, "whoami", "chat-server", "--token", tok,
                                           "--socket", tun_node.socket, "--port", str(d.port)),
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TSNETCHAT_PROXY": ""})
        assert out.returncode == 0, out.stderr
        me = __import__("json").loads(out.stdout)
        assert me["login"] == "chat@tailnet.test" and me["node"].startswith("chat-tun.")
    finally:
        d.proc.terminate()
        d.proc.wait(timeout=15)
        d.notify.close()
