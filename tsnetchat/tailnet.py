"""Talking to the local tailscaled through its LocalAPI (a unix socket).

We use httpx over the socket rather than a LocalAPI client package: the one typed client on
PyPI (tslocal) is synchronous and has neither ``watch-ipn-bus`` nor ``dial``, both of which
we need; httpx is async, streams, and is already well kept. We parse only the fields we use
into small frozen dataclasses, so a newer tailscaled that adds fields does not break us.

``Tailnet`` is the seam the server is built on (status, whois, watch): ``LocalAPI``
implements it for a real tailscaled; tests may pass a stand-in through the same start-up.

Every foreign error is translated here, once:

* the socket is missing / refuses / times out   -> LocalAPIUnavailable
* WhoIs says "no match" (HTTP 404)              -> PeerNotFound
* any other non-2xx answer or unparsable JSON   -> TailnetError
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from .errors import LocalAPIUnavailable, PeerNotFound, TailnetError, TailnetNotReady

DEFAULT_SOCKET = "/var/run/tailscale/tailscaled.sock"
# tailscaled only accepts these Host values on the LocalAPI (a DNS-rebinding guard).
_HOST = "local-tailscaled.sock"

# IPN bus watch options (tailscale ipn.NotifyWatchOpt). Read in tailscale v1.102.3's
# ipn/backend.go and ipn/ipnlocal/local.go, and seen in the lab (2026-11-22): on Linux a
# watcher gets no NetMap after the first message; every full netmap (headscale sends one
# for a policy change and for a node removal, 0.8-1.6 s after it) arrives as SelfChange, peer
# additions and replacements (user, tags, addresses, CapMap) as PeersChanged, removals as
# PeersRemoved. With PEER_PATCHES, Online/LastSeen/Endpoints changes come as narrow patches
# we can ignore instead of full nodes. A packet-filter-only update (Tailscale's incremental
# PacketFilters) is applied without any notice: the gate's periodic re-check covers it.
NOTIFY_INITIAL_STATE = 1 << 1
NOTIFY_PEER_CHANGES = 1 << 12
NOTIFY_PEER_PATCHES = 1 << 15
WATCH_MASK = NOTIFY_INITIAL_STATE | NOTIFY_PEER_CHANGES | NOTIFY_PEER_PATCHES


@dataclass(frozen=True)
class PeerInfo:
    """A node as LocalAPI status shows it (ourselves or a peer)."""

    host_name: str
    dns_name: str  # FQDN with trailing dot, "" when MagicDNS is off
    ips: tuple[str, ...]
    online: bool
    last_seen: str
    login: str
    tags: tuple[str, ...] = ()
    node_id: str = ""  # StableID, as WhoIs names it; survives renames and new addresses

    @property
    def short_name(self) -> str:
        return self.dns_name.split(".", 1)[0] if self.dns_name else self.host_name


@dataclass(frozen=True)
class Status:
    backend_state: str  # "Running", "NeedsLogin", "Stopped", "Starting", "NoState"
    tun: bool  # False in userspace-networking mode
    self_node: PeerInfo
    peers: tuple[PeerInfo, ...]
    magic_dns_suffix: str
    magic_dns_enabled: bool
    health: tuple[str, ...] = ()

    @property
    def running(self) -> bool:
        return self.backend_state == "Running"

    @property
    def ips(self) -> tuple[str, ...]:
        return self.self_node.ips

    @property
    def dns_name(self) -> str:
        return self.self_node.dns_name.rstrip(".")


@dataclass(frozen=True)
class WhoIs:
    """Who is behind a tailnet connection, per tailscaled."""

    login: str  # "tagged-devices" for tagged nodes: use tags
    display_name: str
    node_name: str  # MagicDNS FQDN of the peer device, without trailing dot
    node_id: str
    tags: tuple[str, ...]
    addresses: tuple[str, ...]
    cap_map: Mapping[str, list[Any]] = field(default_factory=dict)
    node_num: int = 0  # the control server's numeric NodeID, as IPN bus patches name it

    @property
    def is_tagged(self) -> bool:
        return bool(self.tags)


@dataclass(frozen=True)
class Change:
    """tailscaled announced that something an identity depends on may have changed.

    ``everything``: any device's answer may differ (a new netmap, our own node, the login
    state, user profiles, or the watch just (re)connected and may have missed notices).
    Otherwise only the devices in ``nodes`` (StableIDs) changed. ``offline``: devices (the
    numeric NodeIDs of ``WhoIs.node_num``) the control server now says are offline; their
    connections are dead or about to be, whatever WhoIs still answers. ``self_node``: our
    own node's StableID, when the notice says it (a new one once the node is registered
    again)."""

    everything: bool = False
    nodes: frozenset[str] = frozenset()
    offline: frozenset[int] = frozenset()
    self_node: str = ""


class Tailnet(Protocol):
    """What the server needs from tailscaled. ``LocalAPI`` is the real one."""

    async def status(self) -> Status: ...

    async def whois(self, addr: str) -> WhoIs:
        """Who is behind ``ip:port``; PeerNotFound when nobody (not a tailnet connection),
        LocalAPIUnavailable/TailnetError when tailscaled cannot say."""
        ...

    def watch(self) -> AsyncIterator[Change]:
        """Changes as tailscaled announces them; the first one is ``everything``. Ends (or
        raises TailnetError) when the connection to tailscaled is lost."""
        ...


def parse_notice(data: Mapping[str, Any]) -> Change | None:
    """What an IPN bus notice means for identities and presence; None when nothing."""
    offline = _offline(data)
    if data.get("SelfChange") or data.get("State") is not None or data.get("UserProfiles") \
            or data.get("PeersRemoved") or data.get("NetMap") or data.get("LoginFinished"):
        return Change(everything=True, offline=offline, self_node=_self_node(data))
    changed = data.get("PeersChanged") or ()
    nodes = frozenset(str(n.get("StableID", "")) for n in changed if isinstance(n, dict))
    if "" in nodes:
        return Change(everything=True, offline=offline)
    if not nodes and not offline:
        return None
    return Change(nodes=nodes, offline=offline)


def _self_node(data: Mapping[str, Any]) -> str:
    """Our own node's StableID if the notice carries it: a full netmap's ``SelfChange``, or
    the ``NetMap`` (its ``SelfNode``) of a watch's first notice; "" otherwise."""
    netmap = data.get("NetMap")
    for node in (data.get("SelfChange"), netmap.get("SelfNode") if isinstance(netmap, dict)
                 else None):
        if isinstance(node, dict) and node.get("StableID"):
            return str(node["StableID"])
    return ""


def _offline(data: Mapping[str, Any]) -> frozenset[int]:
    """NodeIDs the notice says went offline: a patch (``PeerChangedPatch``, how headscale
    v0.29.2 announced a killed tailscaled to its peers, 10.6 s after the kill, in the lab on
    2026-11-22) or a full node, with ``Online: false``."""
    ids = {_int(n.get("NodeID", n.get("ID")))
           for n in [*(data.get("PeerChangedPatch") or ()), *(data.get("PeersChanged") or ())]
           if isinstance(n, dict) and n.get("Online") is False}
    return frozenset(ids - {0})


def _peer_from(d: Mapping[str, Any], users: Mapping[str, Any]) -> PeerInfo:
    user = users.get(str(d.get("UserID")), {}) if users else {}
    return PeerInfo(
        host_name=str(d.get("HostName", "")),
        dns_name=str(d.get("DNSName", "")),
        ips=tuple(d.get("TailscaleIPs") or ()),
        online=bool(d.get("Online", False)),
        last_seen=str(d.get("LastSeen", "")),
        login=str(user.get("LoginName", "")),
        tags=tuple(d.get("Tags") or ()),
        node_id=str(d.get("ID", "")),
    )


def parse_status(data: Mapping[str, Any]) -> Status:
    users = data.get("User") or {}
    tailnet = data.get("CurrentTailnet") or {}
    me = data.get("Self") or {}
    return Status(
        backend_state=str(data.get("BackendState", "")),
        tun=bool(data.get("TUN", False)),
        self_node=_peer_from(me, users),
        peers=tuple(_peer_from(p, users) for p in (data.get("Peer") or {}).values()),
        magic_dns_suffix=str(tailnet.get("MagicDNSSuffix", "")),
        magic_dns_enabled=bool(tailnet.get("MagicDNSEnabled", False)),
        health=tuple(data.get("Health") or ()),
    )


def parse_whois(data: Mapping[str, Any]) -> WhoIs:
    node = data.get("Node") or {}
    profile = data.get("UserProfile") or {}
    return WhoIs(
        login=str(profile.get("LoginName", "")),
        display_name=str(profile.get("DisplayName", "")),
        node_name=str(node.get("Name", "")).rstrip("."),
        node_id=str(node.get("StableID", "")),
        tags=tuple(node.get("Tags") or ()),
        addresses=tuple(a.split("/")[0] for a in node.get("Addresses") or ()),
        cap_map=dict(data.get("CapMap") or {}),
        node_num=_int(node.get("ID")),
    )


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def parse_grpc_peer(peer: str) -> tuple[str, int]:
    """Turn grpc's ``context.peer()`` into (host, port).

    Forms: ``ipv4:127.0.0.1:33634``, ``ipv6:[::1]:56980``, ``ipv6:%5B::1%5D:56980``.
    Raises ValueError for anything else, e.g. ``unix:...``.
    """
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    if kind == "ipv4":
        host, _, port = rest.rpartition(":")
    elif kind == "ipv6":
        if not rest.startswith("[") or "]:" not in rest:
            raise ValueError(f"unexpected ipv6 peer {peer!r}")
        host, _, port = rest[1:].partition("]:")
    else:
        raise ValueError(f"not an IP peer: {peer!r}")
    if not host or not port.isdigit():
        raise ValueError(f"unexpected peer {peer!r}")
    return host, int(port)


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"



def _not_a_socket(path: str) -> str | None:
    """Why ``path`` plainly cannot be tailscaled's socket, or None. (A missing socket, a
    regular file and a directory were all "not answering (ConnectError)", in `doctor` and
    `serve` alike: an operator's run, 2026-11-25.)"""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return ("there is no socket there. Is tailscaled running? (systemctl status "
                "tailscaled, or pass --socket)")
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode)
            else "not a socket")
    return f"that is {kind}, not tailscaled's socket: pass --socket with the socket's path"

class LocalAPI:
    """Async client for one tailscaled's LocalAPI. Cheap to create; `aclose()` when done."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url=f"http://{_HOST}",
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> LocalAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _unavailable(self, exc: Exception) -> LocalAPIUnavailable:
        why = _not_a_socket(self.socket_path)
        return LocalAPIUnavailable(
            f"tailscaled's LocalAPI at {self.socket_path} is not answering: {why}" if why else
            f"tailscaled's LocalAPI at {self.socket_path} is not answering ({type(exc).__name__}). "
            "Is tailscaled running? (systemctl status tailscaled, or pass --socket)"
        )

    async def _get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        try:
            r = await self._client.get(path, params=params)
        except (httpx.TransportError, OSError) as e:
            raise self._unavailable(e) from e
        if r.status_code == 404 and path.endswith("/whois"):
            raise PeerNotFound(r.text.strip() or "no match")
        if r.status_code >= 400:
            raise TailnetError(f"LocalAPI {path} answered {r.status_code}: {r.text.strip()[:200]}")
        try:
            return r.json()
        except json.JSONDecodeError as e:
            raise TailnetError(f"LocalAPI {path} sent invalid JSON") from e

    async def status(self) -> Status:
        return parse_status(await self._get_json("/localapi/v0/status"))

    async def whois(self, addr: str) -> WhoIs:
        """WhoIs for ``ip:port`` (``[v6]:port``). Raises PeerNotFound when there is no match."""
        return parse_whois(await self._get_json("/localapi/v0/whois", {"addr": addr}))

    async def watch(self) -> AsyncIterator[Change]:
        """The IPN bus as ``Change`` notices (see WATCH_MASK). The first notice is
        ``Change(everything=True)``, with ``self_node`` when it carries our node. Ends or
        raises LocalAPIUnavailable/TailnetError when the connection drops; the caller
        decides whether to reconnect."""
        first = True
        async for data in self.watch_raw(WATCH_MASK):
            change = (Change(everything=True, self_node=_self_node(data)) if first
                      else parse_notice(data))
            first = False
            if change is not None:
                yield change

    async def watch_raw(self, mask: int) -> AsyncIterator[dict[str, Any]]:
        """Stream IPN bus notifications, one dict each, until the connection drops."""
        try:
            async with self._client.stream(
                "GET", "/localapi/v0/watch-ipn-bus", params={"mask": str(mask)},
                timeout=httpx.Timeout(self.timeout, read=None),
            ) as r:
                if r.status_code >= 400:
                    raise TailnetError(f"watch-ipn-bus answered {r.status_code}")
                async for line in r.aiter_lines():
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as e:
                            raise TailnetError("watch-ipn-bus sent invalid JSON") from e
        except (httpx.TransportError, OSError) as e:
            raise self._unavailable(e) from e

    async def dial(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw TCP stream to a tailnet peer through tailscaled (works in userspace mode).

        httpx cannot hand over an upgraded connection, so this one speaks HTTP/1.1 itself.
        Needs LocalAPI write access (root, or the tailscaled operator user).
        """
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path), self.timeout)
        except (OSError, TimeoutError) as e:
            raise self._unavailable(e) from e
        writer.write(
            (f"POST /localapi/v0/dial HTTP/1.1\r\nHost: {_HOST}\r\nConnection: upgrade\r\n"
             f"Upgrade: ts-dial\r\nDial-Host: {host}\r\nDial-Port: {port}\r\n"
             "Content-Length: 0\r\n\r\n").encode()
        )
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                OSError) as e:
            writer.close()
            raise TailnetError(f"LocalAPI dial to {host}:{port} failed: no answer") from e
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 101 " not in status_line + " ":
            writer.close()
            body = b""
            with contextlib.suppress(TimeoutError, OSError):
                body = await asyncio.wait_for(reader.read(300), 1)
            raise TailnetError(f"LocalAPI dial to {host}:{port} refused: {status_line} "
                               f"{body.decode(errors='replace').strip()}")
        return reader, writer


async def wait_running(api: Tailnet, timeout: float, *, progress: Any = None) -> Status:
    """Poll status until tailscaled is Running with an address, or raise with advice.

    ``progress(msg)`` is called when the state changes so people see what we wait for.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_msg = ""
    while True:
        try:
            st = await api.status()
            if st.running and st.ips:
                return st
            msg = f"tailscaled is {st.backend_state or 'starting'}"
            advice = {
                "NeedsLogin": "this node is logged out: run `tailscale up` (or give an auth key)",
                "NeedsMachineAuth": "an admin must approve this machine in the tailnet",
                "Stopped": "tailscale is stopped: run `tailscale up`",
            }.get(st.backend_state, "waiting for it to connect")
            err: Exception = TailnetNotReady(f"{msg}; {advice}")
        except LocalAPIUnavailable as e:
            # (with its words, which name the socket: a mistyped --socket read as a
            # tailscaled still starting; an operator's run, 2026-11-24)
            msg, err = f"waiting: {e}", e
        if progress is not None and msg != last_msg:
            progress(msg)
            last_msg = msg
        if loop.time() >= deadline:
            raise err
        await asyncio.sleep(0.5)
