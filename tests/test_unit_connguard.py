"""The connection guard's pure parts (connguard.py): the kernel's table of connections read
right, real sockets shut down by inode, the newest of a device's connections beyond the
limit chosen. Proven against the real lab in test_security_connections.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tsnetchat import connguard
from tsnetchat.connguard import UNKNOWN, ConnectionGuard, Device, established, shut

HEAD = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode\n")


def row(local: str, peer: str, state: str, inode: int) -> str:
    return (f"   0: {local} {peer} {state} 00000000:00000000 00:00000000 00000000     0        "
            f"0 {inode} 1 0000000000000000 100 0 0 10 0\n")


def test_established_connections_on_the_servers_port_are_read_with_their_peers(
        tmp_path: Path) -> None:
    # 127.0.0.1:50051 <- 100.64.0.2:40000 (established); the listener; another port's; and
    # another process's, from port 50051 of another address
    (tmp_path / "tcp").write_text(HEAD + row("0100007F:C383", "02004064:9C40", "01", 11)
                                  + row("0100007F:C383", "00000000:0000", "0A", 12)
                                  + row("0100007F:1F90", "02004064:9C41", "01", 13)
                                  + row("0200007F:C383", "02004064:9C44", "01", 14))
    # [fd7a:115c:a1e0::2]:40002 -> [::1]:50051, and an IPv4-mapped peer ::ffff:100.64.0.3
    (tmp_path / "tcp6").write_text(
        HEAD + row("00000000000000000000000001000000:C383",
                   "5C117AFD0000E0A10000000002000000:9C42", "01", 21)
        + row("00000000000000000000000001000000:C383",
              "0000000000000000FFFF000003004064:9C43", "01", 22))
    assert established(tmp_path, [("127.0.0.1", 50051), ("::1", 50051)]) == {
        11: ("100.64.0.2", 40000), 21: ("fd7a:115c:a1e0::2", 40002), 22: ("100.64.0.3", 40003)}
    assert established(tmp_path, [("127.0.0.1", 8080)]) == {13: ("100.64.0.2", 40001)}
    assert connguard.remote("::ffff:100.64.0.3", 1) == ("100.64.0.3", 1)


def test_a_real_socket_is_shut_down_by_its_inode_and_its_peer_sees_the_end() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    kept = socket.create_connection(listener.getsockname())
    try:
        inode = os.fstat(accepted.fileno()).st_ino
        assert shut([inode], Path("/proc/self/fd")) == {inode}
        client.settimeout(5)
        assert client.recv(1) == b""  # the end, at once
        kept.settimeout(0.2)
        try:
            kept.recv(1)
            raise AssertionError("the other connection was shut too")
        except TimeoutError:
            pass
        assert shut([1 << 40], Path("/proc/self/fd")) == set()  # (no such socket: nothing)
    finally:
        for s in (listener, client, accepted, kept):
            s.close()


async def test_the_newest_connections_of_a_device_over_the_limit_are_the_ones_shut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conns = {i: ("127.0.0.1", 40000 + i) for i in range(1, 7)}
    later = {i: p for i, p in conns.items() if i != 3}  # (3 was shut: gone)
    last = {i: p for i, p in later.items() if i != 2}  # (2 was shut: gone)
    tables = [dict(list(conns.items())[:3]), dict(list(conns.items())[:3]), later, last, last]
    asked: list[str] = []
    shut_down: list[list[int]] = []

    mallory = Device("nMALLORY", "mallory-laptop (mallory@t)")

    async def device_of(addr: str) -> Device | None:
        asked.append(addr)
        if addr.endswith(":40006"):
            return None  # tailscaled did not answer: asked again at the next sweep
        return UNKNOWN if addr.endswith(":40005") else mallory

    with_calls = {("127.0.0.1", 40004): mallory}  # her chat's stream
    guard = ConnectionGuard(2, lambda: with_calls, device_of, lambda: len(with_calls),
                            net_dir=tmp_path, fd_dir=tmp_path)
    guard_established = iter(tables)
    monkeypatch.setattr(connguard, "established", lambda net, ports: next(guard_established))

    def record(inodes: list[int], fd_dir: Path) -> set[int]:
        shut_down.append(sorted(inodes))
        return set(inodes)

    monkeypatch.setattr(connguard, "shut", record)
    here = [("127.0.0.1", 50051)]
    assert await guard.sweep(here) == 0  # 1, 2, 3 seen once, without calls
    assert asked == [] and shut_down == []
    assert await guard.sweep(here) == 1  # 1, 2, 3 asked about: mallory holds them
    assert sorted(asked) == ["127.0.0.1:40001", "127.0.0.1:40002", "127.0.0.1:40003"]
    assert shut_down == [[3]]  # the oldest two kept
    asked.clear()
    # 4 (her chat, with calls: known at once), 5 (not tailscaled's) and 6 arrived
    assert await guard.sweep(here) == 1 and asked == []
    assert shut_down[-1] == [2]  # the stream with calls is kept before the idle ones
    assert await guard.sweep(here) == 0  # 1 and 4 are hers; 5 is held to its address
    assert sorted(asked) == ["127.0.0.1:40005", "127.0.0.1:40006"]
    asked.clear()
    await guard.sweep(here)
    assert asked == ["127.0.0.1:40006"]  # (not taken for "unknown" when it could not say)
    assert guard.closed == 2


def test_the_kernels_table_is_read_only_when_connections_without_calls_may_be_over_a_limit(
        ) -> None:
    known: dict[tuple[str, int], Device] = {}
    held = [40]  # the process's open files

    async def device_of(addr: str) -> Device:
        return UNKNOWN

    guard = ConnectionGuard(10, lambda: known, device_of, lambda: len(known),
                            files=lambda: held[0])
    assert not guard.suspicious(base=30)  # its own files and a few more
    held[0] = 41
    assert guard.suspicious(base=30)  # 11 connections nobody's calls account for
    known.update({("127.0.0.1", 40000 + i): Device("nBOB", "bob-laptop (bob@t)")
                  for i in range(1000)})
    held[0] = 30 + 1000 + 60
    assert not guard.suspicious(base=30)  # (a twentieth of them may be arriving)
    held[0] = 30 + 1000 + 61
    assert guard.suspicious(base=30)
    assert connguard.open_files(Path("/proc/self/fd")) >= 3


async def test_a_device_renamed_between_sweeps_is_still_one_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """A device's name is its owner's to change (``tailscale set --hostname``): counted by
    name, a device renamed after each batch of connections held the limit once under each
    name (an attacker's run over the lab, 2026-11-25). It is counted by its node id, and
    the log names it as its newest connection found it."""
    batches = [{i: ("127.0.0.1", 40000 + i) for i in range(1, n + 1)} for n in (2, 2, 4, 4)]
    tables = iter(batches)
    monkeypatch.setattr(connguard, "established", lambda net, ports: next(tables))
    monkeypatch.setattr(connguard, "shut", lambda inodes, fd_dir: set(inodes))
    name = ["mallory-laptop"]

    async def device_of(addr: str) -> Device:
        return Device("nMALLORY", f"{name[0]} (mallory@t)")

    guard = ConnectionGuard(2, dict, device_of, lambda: 0, net_dir=tmp_path, fd_dir=tmp_path)
    here = [("127.0.0.1", 50051)]
    assert await guard.sweep(here) == 0
    assert await guard.sweep(here) == 0  # 1, 2: hers, at the limit
    name[0] = "mallory-renamed"
    assert await guard.sweep(here) == 0  # 3, 4 seen once
    caplog.set_level("WARNING", "tsnetchat.connguard")
    assert await guard.sweep(here) == 2  # 3, 4 asked about: the same device, over it
    assert "'mallory-renamed (mallory@t)'" in caplog.text
