"""The pure parts of discovery: tailnet ranges, proxies, where the LocalAPI is on each
platform, and the bridge's shutdown. The behaviour over real tailscaled is test_discovery.py."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

import pytest

from tsnetchat.discovery import (
    DialBridge,
    Proxy,
    ProxyRefused,
    check_name,
    discover,
    is_tailnet_ip,
    localapi_places,
    macos_app_endpoint,
    parse_lsof,
    parse_proxy,
    parse_sameuserproof,
    read_macsys,
    socks5_connect,
)
from tsnetchat.errors import ConfigError, InvalidInput


@pytest.mark.parametrize(("ip", "ok"), [
    ("100.64.0.1", True), ("100.127.255.254", True), ("fd7a:115c:a1e0::1", True),
    ("[fd7a:115c:a1e0::1]", True), ("100.128.0.1", False), ("100.63.255.255", False),
    ("192.168.1.5", False), ("fd7a:115c:a1e1::1", False), ("chat-server", False),
])
def test_only_tailscales_ranges_count_as_tailnet_addresses(ip: str, ok: bool) -> None:
    assert is_tailnet_ip(ip) is ok


def test_proxies_are_read_with_or_without_a_scheme() -> None:
    assert parse_proxy("127.0.0.1:1055") == Proxy("http", "127.0.0.1", 1055)
    assert parse_proxy("socks5h://localhost:1080/") == Proxy("socks5", "localhost", 1080)
    assert parse_proxy("http://[::1]:8080").url == "http://[::1]:8080"
    for bad in ("ftp://h:1", "h", "socks5://h:0", "http://:1", "http://[::1", "[::1]",
                "http://[nope]:1", "u@h:1", "a b:1", "::1:8080", "h/x:1", "é:1"):
        with pytest.raises(ConfigError, match=r"--proxy: .* is not a proxy address"):
            parse_proxy(bad)


def test_the_macos_apps_password_is_read_from_its_file_names_and_files(
        tmp_path: Path) -> None:
    assert parse_sameuserproof("sameuserproof-61577-2ae2ec9e0aa2005784f1") == (
        61577, "2ae2ec9e0aa2005784f1")
    assert parse_sameuserproof("sameuserproof-61577") is None
    lsof = ("p123\nn/private/var/folders/x/T/io.tailscale.ipn.macos/"
            "sameuserproof-50123-abcdef\n")
    assert parse_lsof(lsof) == (50123, "abcdef")
    assert parse_lsof("p1\nn/tmp/other\n") is None
    (tmp_path / "ipnport").symlink_to("41112")
    (tmp_path / "sameuserproof-41112").write_text("s3cret\n")
    assert read_macsys(str(tmp_path)) == (41112, "s3cret")
    assert read_macsys(str(tmp_path / "absent")) is None
    shared = tmp_path / "cli-shared"
    shared.mkdir()
    (shared / "sameuserproof-40001-fromcli").write_text("")
    place = macos_app_endpoint(env={"TS_MACOS_CLI_SHARED_DIR": str(shared)},
                               shared_dir=str(tmp_path))
    assert place is not None and (place.port, place.password) == (40001, "fromcli")
    place = macos_app_endpoint(env={}, shared_dir=str(tmp_path))
    assert place is not None and "s3cret" not in repr(place)


def test_where_the_localapi_is_looked_for_on_each_platform() -> None:
    places, absent = localapi_places("/some/where.sock")
    assert [p.socket for p in places] == ["/some/where.sock"] and absent == []
    places, absent = localapi_places(platform="win32")
    assert places == [] and "tailscale command" in absent[0]
    places, absent = localapi_places(platform="linux")
    if not os.path.exists("/var/run/tailscale/tailscaled.sock"):
        assert "no socket at /var/run/tailscale/tailscaled.sock" in absent


async def test_a_socks5_refusal_is_reported_in_words() -> None:
    """A stand-in proxy that accepts the greeting and refuses the connection (reply 5)."""
    async def proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(3)
        w.write(b"\x05\x00")
        await r.readexactly(4 + 4 + 2)
        w.write(b"\x05\x05\x00\x01" + bytes(4) + bytes(2))
        await w.drain()
        w.close()

    srv = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProxyRefused, match="SOCKS5 reply: connection refused"):
            await socks5_connect(Proxy("socks5", "127.0.0.1", port), "100.64.0.1", 50051)
    finally:
        srv.close()


async def test_closing_the_bridge_ends_its_connections_without_a_stray_task(
        caplog: pytest.LogCaptureFixture) -> None:
    """A connection carried by the bridge is ended by close(), and its handler finishes
    normally (Python 3.11 logs a handler that is merely cancelled at loop end)."""
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(100):
            w.write(data)
        w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    bridge = DialBridge(lambda: asyncio.open_connection("127.0.0.1", port))
    addr = await bridge.start()
    r, w = await asyncio.open_unix_connection(addr.removeprefix("unix:"))
    w.write(b"ping")
    assert await r.readexactly(4) == b"ping"
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await bridge.close()
        assert await asyncio.wait_for(r.read(), 5) == b""  # the carried connection ended
        await asyncio.sleep(0)
    assert not bridge._handlers  # every handler finished
    assert not os.path.exists(bridge.path)
    assert not [rec for rec in caplog.records if rec.name == "asyncio"]
    w.close()
    srv.close()


@pytest.mark.parametrize(("name", "words"), [
    ("", "no server given"),
    ("  ", "no server given"),
    ("a" * 300, "is not a server name: a name is at most 253 characters"),
    ("x" * 64 + ".tailnet.test", "each part between dots at most 63"),
    ("chat server", "is not a server name: give its MagicDNS name"),
    ("chat-server:50621", "a port goes in --port (or TSNETCHAT_PORT): chat-server --port 50621"),
    ("100.64.0.5:50621", "a port goes in --port (or TSNETCHAT_PORT): 100.64.0.5 --port 50621"),
])
async def test_a_server_name_that_cannot_be_one_is_bad_input_before_any_lookup(
        name: str, words: str) -> None:
    # (--socket names nothing: the check comes before any step would fail to find it)
    with pytest.raises(InvalidInput, match=re.escape(words)):
        await discover(name, socket="/nonexistent/tailscaled.sock")


@pytest.mark.parametrize("name", ["chat-server", "chat-server.tailnet.test.", "100.64.0.5",
                                  "[fd7a:115c:a1e0::5]", "a" * 63 + ".b"])
def test_names_and_addresses_of_a_server_pass_the_check(name: str) -> None:
    check_name(name)


def test_with_this_machines_tailscaled_stopped_the_headline_says_so(tmp_path: Path) -> None:
    """It led with "cannot find 'chat-server' on the tailnet; no step could list this
    tailnet's peers", the cause only in step 1 (a new user's day)."""
    from helpers import run_cli

    out = run_cli("whoami", "nosuchhost-zz", "--socket", str(tmp_path / "tailscaled.sock"))
    assert out.returncode == 4, out.stderr
    assert out.stderr.startswith("error: cannot find 'nosuchhost-zz': this machine's "
                                 "tailscaled does not answer (is it running?"), out.stderr


def test_a_stale_socket_asks_whether_tailscaled_is_running_once(tmp_path: Path) -> None:
    """"nothing answers there (a stale socket? is tailscaled running?). Is tailscaled
    running? (...)" (a newcomer, 2026-11-24)."""
    import socket

    from helpers import run_cli

    stale = tmp_path / "tailscaled.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # (bound, never listening, closed: the file stays and refuses)
    out = run_cli("whoami", "nosuchhost-zz", "--socket", str(stale))
    assert out.returncode == 4, out.stderr
    step = next(line for line in out.stderr.splitlines() if "1. LocalAPI" in line)
    assert "nothing answers there (a stale socket? is tailscaled running?)" in step, step
    assert step.lower().count("is tailscaled running") == 1, step


def test_a_peer_tailscaled_never_saw_is_offline_since_never_not_since_the_year_1() -> None:
    """Go's zero time showed as "last seen 0001-01-01T00:00:00Z" (an operator's run)."""
    from tsnetchat.discovery import find_peer
    from tsnetchat.errors import TailnetError
    from tsnetchat.tailnet import PeerInfo, Status

    def peer(last_seen: str) -> PeerInfo:
        return PeerInfo(host_name="chat-server", dns_name="chat-server.example.ts.net.",
                        ips=("100.64.0.1",), online=False, last_seen=last_seen, login="",
                        node_id="n1")

    me = PeerInfo(host_name="me", dns_name="me.example.ts.net.", ips=("100.64.0.2",),
                  online=True, last_seen="", login="", node_id="n2")
    for seen, said in (("0001-01-01T00:00:00Z", "never"), ("", "never"),
                       ("2026-11-24T09:00:00Z", "2026-11-24T09:00:00Z")):
        status = Status(backend_state="Running", tun=True, self_node=me, peers=(peer(seen),),
                        magic_dns_suffix="example.ts.net", magic_dns_enabled=True)
        with pytest.raises(TailnetError, match=rf"offline \(last seen {said}\)"):
            find_peer(status, "chat-server")


def test_a_tailscaled_that_never_answers_is_asked_about_once(tmp_path: Path) -> None:
    """A frozen tailscaled (the socket listens, nothing answers): the LocalAPI's own words
    ask "Is tailscaled running?" with a capital, and the step asked again (a daily user,
    2026-11-25)."""
    import socket

    from helpers import run_cli

    frozen = tmp_path / "tailscaled.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(frozen))
        s.listen(8)  # (accepted by the kernel, never read)
        out = run_cli("whoami", "nosuchhost-zz", "--socket", str(frozen))
    assert out.returncode == 4, out.stderr
    step = next(line for line in out.stderr.splitlines() if "1. LocalAPI" in line)
    assert "is not answering" in step, step
    assert step.lower().count("is tailscaled running") == 1, step
