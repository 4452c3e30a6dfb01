"""A limit on the connections one device holds open (``max_connections_per_device``).

A tailnet peer needs no token to open a TCP connection to the server and speak HTTP/2 on it:
gRPC keeps such a connection for as long as its pings are answered, and the gate, which runs
when a call arrives, never sees one that makes no call. 1,050 of them from one device, each
a file descriptor, left a server at systemd's default limit (1,024) unable to accept anyone,
with nothing in its log (an attacker's run over the lab, 2026-11-24). gRPC has no limit per
peer, so this module keeps one. Every ``SWEEP_SECONDS`` it counts the process's open files,
and when connections without calls may be over the limit (``ConnectionGuard.suspicious``)
it reads the process's established TCP connections on the server's ports
(``/proc/self/net/tcp`` and ``tcp6``), learns each one's device (from the gate for a
connection with calls; from WhoIs, once, for one seen in two sweeps without any), and shuts
down the newest of a device's connections beyond the limit (``shutdown(2)`` on the socket:
gRPC sees the connection end and closes it). A connection tailscaled does not know counts
against its address.

The units also raise the file limit (``LimitNOFILE``), so that what a device opens between
two sweeps cannot use up the descriptors either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

SWEEP_SECONDS = 2.0
SAY_EVERY = 60.0  # seconds between two log lines about one device

Remote = tuple[str, int]  # (host as ipaddress writes it, port)


class Device(NamedTuple):
    """A device as the guard counts it: by ``key``, its stable node id (its name is its
    owner's to change: renamed between sweeps, one device held the limit once under each
    name; an attacker's run over the lab, 2026-11-25), shown in the log as ``name`` (as
    its newest connection found it). No key: tailscaled does not know the connection."""

    key: str
    name: str


UNKNOWN = Device("", "")


def remote(host: str, port: int) -> Remote:
    """``host`` as ipaddress writes it (IPv4 for an IPv4-mapped IPv6 address), with ``port``:
    one spelling for gRPC's peer and the kernel's table."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (str(mapped or ip), port)


def _address(hexed: str) -> Remote:
    """A ``/proc/net/tcp{,6}`` address (``0100007F:C35F``: 32-bit words in host order)."""
    ip_hex, _, port_hex = hexed.partition(":")
    raw = bytes.fromhex(ip_hex)
    if sys.byteorder == "little":  # (the words are printed as the host holds them)
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return remote(str(ipaddress.ip_address(raw)), int(port_hex, 16))


def established(net_dir: Path, listening: Collection[Remote]) -> dict[int, Remote]:
    """The established TCP connections to the server's addresses (``listening``, as
    ``remote`` spells them): socket inode -> the peer's address. (The table is the network
    namespace's: another process's connection from the same port number on another address
    is in it too.)"""
    ends = tuple({f":{port:04X}" for _, port in listening})
    mine = set(listening)
    found: dict[int, Remote] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = (net_dir / name).read_text().splitlines()[1:]
        except OSError:
            continue  # (no IPv6 in this kernel)
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "01" and f[1].endswith(ends) and _address(f[1]) in mine:
                found[int(f[9])] = _address(f[2])
    return found


def shut(inodes: Iterable[int], fd_dir: Path) -> set[int]:
    """Shut down this process's sockets with these inodes; the inodes that were."""
    wanted = set(inodes)
    done: set[int] = set()
    for entry in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / entry)
        except OSError:
            continue  # (closed meanwhile)
        if not target.startswith("socket:["):
            continue
        inode = int(target[8:-1])
        if inode not in wanted:
            continue
        try:
            copy = os.dup(int(entry))
        except OSError:
            continue  # (closed meanwhile)
        try:
            s = socket.socket(fileno=copy)
        except OSError:  # (the number now names a file that is not a socket)
            os.close(copy)
            continue
        try:  # (the descriptor may have been closed and reused since it was read)
            if os.fstat(s.fileno()).st_ino == inode:
                s.shutdown(socket.SHUT_RDWR)
                done.add(inode)
        except OSError:
            pass
        finally:
            s.close()  # (our copy only; gRPC closes its own)
    return done


class ConnectionGuard:
    """At most ``limit`` connections open from one device. ``devices`` says the device of
    each connection with calls (``Gate.connections``), ``calls`` how many connections have
    calls (``Gate.connection_count``, cheap); ``device_of`` asks tailscaled about one without
    (``Gate.device``: ``UNKNOWN`` when tailscaled does not know it, None when it could not
    say)."""

    def __init__(self, limit: int, devices: Callable[[], dict[Remote, Device]],
                 device_of: Callable[[str], Awaitable[Device | None]],
                 calls: Callable[[], int],
                 *, net_dir: Path = Path("/proc/self/net"), fd_dir: Path = Path("/proc/self/fd"),
                 files: Callable[[], int] | None = None, interval: float = SWEEP_SECONDS
                 ) -> None:
        self.limit = limit
        self._devices, self._device_of, self._calls = devices, device_of, calls
        self.net_dir, self.fd_dir, self.interval = net_dir, fd_dir, interval
        self.files = files or (lambda: open_files(fd_dir))
        self.closed = 0  # connections shut down, for the metrics
        self._sweeps = 0
        self._first: dict[int, int] = {}  # inode -> the sweep that first saw it
        self._device: dict[int, Device] = {}  # inode -> its device, once known
        self._said: dict[str, float] = {}  # device key -> when its connections were last logged

    async def run(self, listening: Collection[Remote], base: int) -> None:
        """Every ``interval``: a sweep when ``suspicious``. ``base``: the files the process
        held before it listened (database, logs, tailscaled's socket, ...)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                if self.suspicious(base):
                    await self.sweep(listening)
                else:  # (and a connection seen before starts over: two sweeps, then WhoIs)
                    self._first.clear()
                    self._device.clear()
            except Exception:  # pragma: no cover - the next sweep tries again
                log.exception("the connection guard's sweep failed")

    def suspicious(self, base: int) -> bool:
        """Whether the process holds more files than its own (``base``) and its connections
        with calls account for, by more than the limit (and a twentieth of those, for
        connections whose first call is on its way): only then is the kernel's table read.
        Reading it costs about 18 ms a thousand connections (2026-11-24, this machine), much
        of it on the loop's core: swept every 2 s regardless, 100 msg/s into 1,000
        subscribers went from p99 36.5 to 48.3 ms (medians of three alternated runs). So a
        device's connections with calls are held to the limit only when a sweep runs."""
        known = self._calls()
        return self.files() - known > base + self.limit + known // 20

    async def sweep(self, listening: Collection[Remote]) -> int:
        """One look at the connections; how many were shut down."""
        conns = await asyncio.to_thread(established, self.net_dir, listening)
        self._sweeps += 1
        for gone in self._first.keys() - conns.keys():
            del self._first[gone]
            self._device.pop(gone, None)
        with_calls = self._devices()
        ask: list[tuple[int, Remote]] = []
        for inode, peer in conns.items():
            first = self._first.setdefault(inode, self._sweeps)
            if peer in with_calls:
                self._device[inode] = with_calls[peer]
            elif inode not in self._device and first < self._sweeps:
                ask.append((inode, peer))  # no call since the sweep before: ask tailscaled
        if ask:
            said = await asyncio.gather(*(self._device_of(_spelled(p)) for _, p in ask))
            for (inode, peer), device in zip(ask, said, strict=True):
                if device is not None:  # (None: tailscaled could not say; ask again later)
                    self._device[inode] = device if device.key else Device(
                        f"address {peer[0]}", f"address {peer[0]}")
        held: defaultdict[str, list[int]] = defaultdict(list)
        for inode in conns:
            if inode in self._device:
                held[self._device[inode].key].append(inode)
        excess: dict[str, tuple[int, list[int]]] = {}
        for key, inodes in held.items():
            if len(inodes) > self.limit:
                # Kept: connections with calls first (a chat's stream over idle sockets),
                # then the oldest.
                inodes.sort(key=lambda i: (conns[i] not in with_calls, self._first[i], i))
                excess[key] = (len(inodes), inodes[self.limit:])
        if not excess:
            return 0
        done = await asyncio.to_thread(  # (one walk of the process's files for them all)
            shut, [i for _, inodes in excess.values() for i in inodes], self.fd_dir)
        now = time.monotonic()
        for key, (held_n, inodes) in excess.items():
            closed = len(done.intersection(inodes))
            if closed and now - self._said.get(key, -SAY_EVERY) >= SAY_EVERY:
                self._said[key] = now  # (an attack goes on: a line a minute)
                log.warning("closed %d connection(s) of device %r: it held %d open at once, "
                            "more than max_connections_per_device (%d)", closed,
                            self._device[inodes[-1]].name, held_n, self.limit)
        self.closed += len(done)
        return len(done)


def open_files(fd_dir: Path) -> int:
    """How many files the process has open: the size Linux (6.2 and later) gives its fd
    directory, else a count of its entries."""
    try:
        return os.stat(fd_dir).st_size or len(os.listdir(fd_dir))
    except OSError:
        return 0


def raise_file_limit() -> int:
    """The soft limit on open files raised to the hard one (systemd's default soft limit is
    1,024: a device holding that many connections between two sweeps stops the server
    accepting). The limit afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (OSError, ValueError):  # (a seccomp filter refusing @resources: the unit's
            pass                         # LimitNOFILE= has set it already)
    return soft


def _spelled(peer: Remote) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
