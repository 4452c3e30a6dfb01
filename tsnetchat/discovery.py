"""Finding the server on the tailnet and dialling it.

Discovery asks the local tailscaled (LocalAPI status) for the peer by MagicDNS short name,
full name, or tailnet IP. Transport is chosen from what the local node can do:

* TUN mode: dial the peer's tailnet IP directly;
* userspace mode with a proxy (``--proxy`` / TSNETCHAT_PROXY): gRPC's own HTTP CONNECT
  support, addressed by MagicDNS name (tailscaled's proxy resolves it);
* userspace mode without a proxy: a private unix socket whose connections are carried by
  LocalAPI ``dial`` (needs LocalAPI write access, e.g. root or the tailscaled operator).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import ipaddress
import os
import tempfile
from dataclasses import dataclass

import grpc

from .errors import PeerNotFound, TailnetError, TailnetNotReady, TsnetchatError
from .netio import splice
from .tailnet import LocalAPI, PeerInfo, Status


@dataclass(frozen=True)
class Target:
    """Where and how to reach the server."""

    name: str  # what to show people
    host: str  # MagicDNS FQDN or IP
    ip: str
    port: int
    mode: str  # "direct", "proxy", "localapi", "address"


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def find_peer(status: Status, name: str) -> PeerInfo:
    """Match ``name`` against peers: IP, full MagicDNS name, short name, or host name.

    Raises PeerNotFound with the closest names, or TailnetError when the peer is offline.
    """
    want = _norm(name)
    try:
        ip = str(ipaddress.ip_address(want))
    except ValueError:
        ip = ""
    candidates = [*status.peers, status.self_node]
    for p in candidates:
        if (ip and ip in p.ips) or want in (_norm(p.dns_name), p.short_name.lower(),
                                            p.host_name.lower()):
            if p is not status.self_node and not p.online:
                seen = p.last_seen or "never"
                raise TailnetError(f"{p.short_name} is on the tailnet but offline (last seen "
                                   f"{seen}); is the server's machine up?")
            return p
    if not ip and "." not in want and not status.magic_dns_enabled:
        raise PeerNotFound(f"no peer named {name!r}, and MagicDNS is off on this tailnet: use "
                           "the server's tailnet IP, or turn MagicDNS on")
    names = sorted({p.short_name for p in status.peers})
    close = difflib.get_close_matches(want.split(".")[0], names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        f"; peers: {', '.join(names[:10])}" if names else "; this node sees no peers")
    raise PeerNotFound(f"no peer named {name!r} on this tailnet{hint}")


async def resolve(api: LocalAPI, name: str, port: int, *, proxy: str = "") -> Target:
    st = await api.status()
    if not st.running:
        raise TailnetNotReady(f"the local tailscaled is {st.backend_state}; run `tailscale up`")
    peer = find_peer(st, name)
    ip = next((i for i in peer.ips if ":" not in i), peer.ips[0] if peer.ips else "")
    host = peer.dns_name.rstrip(".") or ip
    if st.tun:
        mode = "direct"
    elif proxy:
        mode = "proxy"
    else:
        mode = "localapi"
    return Target(name=peer.short_name, host=host, ip=ip, port=port, mode=mode)


CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    # One Connection, one TCP connection: grpc's Python client otherwise shares a connection
    # between all channels to the same target (its global subchannel pool), so a "new"
    # connection could silently be an old one, with the old one's server-side identity.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


class DialBridge:
    """A private unix socket; each connection to it is carried to the peer by LocalAPI dial.

    gRPC cannot use a custom dialer from Python, so we give it a socket it can dial.
    """

    def __init__(self, api: LocalAPI, host: str, port: int) -> None:
        self.api, self.host, self.port = api, host, port
        self._dir = tempfile.mkdtemp(prefix="tsnetchat-")
        self.path = os.path.join(self._dir, "dial.sock")
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        os.chmod(self.path, 0o600)
        return f"unix:{self.path}"

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            upstream = await self.api.dial(self.host, self.port)
        except TsnetchatError:
            w.close()
            return
        await splice((r, w), upstream)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self._dir)


async def open_channel(target: Target, *, proxy: str = "",
                       api: LocalAPI | None = None) -> tuple[grpc.aio.Channel, DialBridge | None]:
    opts = list(CHANNEL_OPTIONS)
    if target.mode == "proxy":
        opts += [("grpc.http_proxy", proxy if "://" in proxy else f"http://{proxy}"),
                 ("grpc.enable_http_proxy", 1)]
        return grpc.aio.insecure_channel(f"{target.host}:{target.port}", options=opts), None
    if target.mode == "localapi":
        assert api is not None
        bridge = DialBridge(api, target.ip or target.host, target.port)
        addr = await bridge.start()
        opts += [("grpc.default_authority", f"{target.host}:{target.port}"),
                 ("grpc.enable_http_proxy", 0)]
        return grpc.aio.insecure_channel(addr, options=opts), bridge
    host = f"[{target.ip}]" if ":" in target.ip else target.ip
    opts.append(("grpc.enable_http_proxy", 0))
    return grpc.aio.insecure_channel(f"{host}:{target.port}", options=opts), None
