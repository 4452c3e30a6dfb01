"""The door: turns (peer address, metadata) into a Principal or a refusal.

Identity is looked up with WhoIs on the connection's peer address. It is cached per
connection, never per message: an entry lives while at least one call on that peer
address is in progress (a TCP 4-tuple cannot belong to two live connections, so concurrent
calls with the same peer string share one connection). When the last call ends, the entry
is dropped, because after the connection closes the same source port may be reused by a
different tailnet peer.

Fail closed: no WhoIs match, LocalAPI down or slow, or a non-IP peer -> refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from . import auth
from .errors import LocalAPIUnavailable, PeerNotFound, TailnetError, Unauthenticated
from .tailnet import WhoIs, format_addr, parse_grpc_peer

WhoIsFunc = Callable[[str], Awaitable[WhoIs]]


class Unavailable(LocalAPIUnavailable):
    """WhoIs could not be answered in time; the caller may retry (gRPC UNAVAILABLE)."""


@dataclass
class _Entry:
    refs: int
    task: asyncio.Task[WhoIs]


class Gate:
    def __init__(self, *, whois: WhoIsFunc, key: bytes, cap_name: str, require_grant: bool,
                 whois_timeout: float = 2.0, revoked: Iterable[str] = ()) -> None:
        self._whois = whois  # replaceable so unit tests can stand in for tailscaled
        self.key = key
        self.cap_name = cap_name
        self.require_grant = require_grant
        self.whois_timeout = whois_timeout
        self.revoked: set[str] = set(revoked)
        self._cache: dict[str, _Entry] = {}
        self.whois_calls = 0

    @asynccontextmanager
    async def identity(self, peer: str) -> AsyncIterator[WhoIs]:
        """WhoIs of ``peer`` (grpc peer string), shared by concurrent calls on one connection."""
        entry = self._cache.get(peer)
        if entry is None:
            entry = _Entry(0, asyncio.ensure_future(self._lookup(peer)))
            self._cache[peer] = entry
        entry.refs += 1
        try:
            yield await asyncio.shield(entry.task)
        finally:
            entry.refs -= 1
            if entry.refs == 0 and self._cache.get(peer) is entry:
                del self._cache[peer]

    async def _lookup(self, peer: str) -> WhoIs:
        try:
            host, port = parse_grpc_peer(peer)
        except ValueError:
            raise Unauthenticated("tailnet lock: this connection is not an IP connection "
                                  "through tailscaled") from None
        self.whois_calls += 1
        try:
            return await asyncio.wait_for(self._whois(format_addr(host, port)), self.whois_timeout)
        except PeerNotFound:
            raise Unauthenticated(
                "tailnet lock: this connection did not come through tailscaled (WhoIs has no "
                "match for it); connect over the tailnet") from None
        except TimeoutError:
            raise Unavailable("cannot verify your tailnet identity: tailscaled did not answer "
                              "WhoIs in time; try again") from None
        except LocalAPIUnavailable as e:
            raise Unavailable(f"cannot verify your tailnet identity: {e}") from None
        except TailnetError as e:
            raise Unavailable(f"cannot verify your tailnet identity: {e}") from None

    def admit(self, who: WhoIs, token: str) -> auth.Principal:
        """Both locks plus revocation and grants; raises Unauthenticated/PermissionDenied."""
        claims = auth.verify_token(self.key, token)
        if claims.token_id in self.revoked:
            raise Unauthenticated("token lock: this token has been revoked; ask an admin for a "
                                  "new one")
        grant = auth.grant_from_capmap(who.cap_map, self.cap_name)
        return auth.authorize(who, claims, grant, require_grant=self.require_grant)

    @asynccontextmanager
    async def enter(self, peer: str,
                    metadata: Iterable[tuple[str, str | bytes]]) -> AsyncIterator[auth.Principal]:
        """Admit a call for its whole duration (keeps the connection's WhoIs cached)."""
        token = auth.bearer_token(metadata)  # cheap check first: no token, no WhoIs
        async with self.identity(peer) as who:
            yield self.admit(who, token)
