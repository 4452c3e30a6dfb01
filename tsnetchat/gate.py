"""The door, and what keeps it shut behind every caller.

``Gate.admit`` turns (connection, metadata) into a ``Lease`` that stays true for as long as
the call runs, or into a refusal. Cheapest checks first, so that refusals cost little:

1. the refusal budget of the connection and of its device (on a TUN node, of its tailnet
   address too: known before any WhoIs): one that keeps being refused is refused
   (RESOURCE_EXHAUSTED) without its token being read, the answer held ``HOLD`` seconds;
2. the token: size, shape, header, HMAC, claims, revocation (no I/O at all);
3. the tailnet identity: WhoIs on the connection's address, asked once per connection and
   shared by its concurrent calls, at most ``WHOIS_SLOTS`` lookups at a time; no answer in
   time, or no tailscaled: refused (fail closed);
4. the server's own node (refused unless ``allow_own_node``; also once it is registered
   again under a new node id, ``tailnet_changed``), and in cluster mode the other servers'
   (``other_servers``), then the two locks must agree, and grants narrow the token's
   rights (``auth.authorize``).

Authorization is continuous. A lease is decided again, within a second, when an input to its
decision changes:

* a token is revoked (``revoke``): its leases fail at once;
* the key or the settings change (``apply``): every lease is decided again (no WhoIs);
* tailscaled announces a change on its IPN bus (``tailnet_changed``): the identity of every
  connection the change may concern is stale, is asked again, and its leases decided again;
  a device the control server says went offline has its leases failed at once (UNAVAILABLE):
  its connections are dead, or will be, even while WhoIs still names it (presence must not
  wait for TCP to notice; gRPC keepalive is the other half, server.GRPC_OPTIONS);
* the token expires: its leases fail at ``exp`` + ``auth.LEEWAY``;
* every ``recheck_interval`` seconds (every second while the IPN bus is lost), one
  connection per device with leases is asked again and the answer compared: the backstop
  for changes tailscaled applies without announcing them (see tailnet.WATCH_MASK).

A lease fails when the locks no longer pass (its error names the lock), when tailscaled
cannot answer (UNAVAILABLE: fail closed), or when the room its stream holds is no longer
allowed; otherwise it takes the new, possibly narrower, rights. A stream attaches to its
lease (``Lease.attach``) and is closed when it fails; a Join is admitted (and so
registered) before its hello is read, and ``Lease.hold_room`` decides again before the
room is entered if anything changed meanwhile, as ``Lease.current`` does before the Join's
next event is read. A token is checked again once its call's WhoIs is answered: a
revocation or a new key acts on the leases held, and the call had none yet.

The identity cache belongs to one connection: an entry lives while at least one call on
that peer address is in progress (a TCP 4-tuple cannot belong to two live connections), is
dropped with the last one (the port may then be reused by another device), and is never
used after a change that may concern it: it is asked again before anything is admitted on
it. The device behind a connection never changes during its life: if WhoIs names another
device, its calls fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from . import auth
from .connguard import UNKNOWN, Device, remote
from .errors import (
    InvalidInput,
    LimitExceeded,
    LocalAPIUnavailable,
    PeerNotFound,
    PermissionDenied,
    TailnetError,
    TsnetchatError,
    Unauthenticated,
    Unavailable,
)
from .tailnet import Change, Tailnet, WhoIs, format_addr, parse_grpc_peer
from .throttle import Buckets, LogLimiter, retry_in

log = logging.getLogger("tsnetchat.gate")

# WhoIs lookups in flight at once; the others wait (within whois_timeout). One costs the
# server 1.0-1.4 ms of CPU through httpx, and ran slower, not faster, when 300 were issued at
# once (2.2-2.9 ms each; measured in the lab, 2026-11-22): a burst of new connections queues
# here instead of in tailscaled.
WHOIS_SLOTS = 16
GUARD_SLOTS = 4  # the connection guard's lookups at a time (``Gate.device``)
UNANSWERED = "?"  # ``Gate.device_behind``'s device for a peer WhoIs did not answer for
# Refusals one connection, and one device, may collect (burst, then per second) before its
# calls are refused unread. The shipped clients stop at the first UNAUTHENTICATED or
# PERMISSION_DENIED; anything beyond a handful is a script or an attack (issue 14 saw
# 1,000-2,000 refusals/s from one peer).
CONN_REFUSALS = (10, 1.0)
NODE_REFUSALS = (20, 1.0)
# Seconds a call refused unread waits for its answer (``Gate.hold``). Answered at once, such
# a call still cost the loop a whole gRPC call (about 160 us, mostly grpc.aio's own: the
# gate's checks were under a tenth of it), and gRPC serves calls in the order they arrive: a
# junk token on 64 connections, 2,600-3,600 calls a second, put alice's WhoAmI at p50 160-440
# ms instead of 5. Held, a device's calls wait on its own connections' stream limit
# (server.streams_per_connection) instead of in front of everyone else's: 180-480 a second,
# alice's p50 5-8 ms, the loop's CPU a fifth. Held 1 s, 32 calls in flight per connection
# still put her p50 at 250-460 ms. Shutting the connection down instead did not help: the
# flood reconnected through tailscaled (45-95 times a second) and the churn cost the server
# as much as the calls. (Over the lab, 2026-11-25, bench/refusal_flood.py.) A client that
# stops as told never waits: its first refusals are answered at once.
HOLD = 5.0
BLIND_INTERVAL = 1.0  # seconds between re-checks while tailscaled's IPN bus is not followed
SETTLE = 0.05  # changes arriving this close together are handled in one round
OFFLINE = ("the device went offline on the tailnet (its coordination server lost it); "
           "reconnect when it is back")


def _token_gone(what: str, token_id: str) -> Unauthenticated:
    """A token revoked or expired: what happened, and where a new one comes from."""
    return Unauthenticated(f"token lock: {what}; {auth.new_token_advice(token_id)}")


@dataclass(frozen=True)
class Policy:
    """Everything a decision depends on besides the token and the tailnet's answer."""

    key: bytes
    cap_name: str
    require_grant: bool
    logins_need_grant: bool = True  # enroll is not "any" (auth.authorize)
    allow_own_node: bool = False


class _Conn:
    """One client connection (peer address) while it has calls in progress."""

    __slots__ = ("addr", "leases", "lookup", "node_id", "peer", "refs", "source", "stale",
                 "who")

    def __init__(self, peer: str, addr: str, source: str = "") -> None:
        self.peer, self.addr = peer, addr  # addr "" when it is not an IP connection
        self.source = source  # its address's refusal budget (``_source``), "" for none
        self.refs = 0
        self.lookup: asyncio.Task[WhoIs] | None = None
        self.stale = False  # a change may concern it: ask tailscaled again before use
        self.node_id = ""  # the device, once known; it never changes for a connection
        self.who: WhoIs | None = None
        self.leases: set[Lease] = set()


class Lease:
    """One admitted call: its current rights (``principal``), or why it may no longer run
    (``error``)."""

    def __init__(self, gate: Gate, conn: _Conn, token: str, claims: auth.Claims,
                 principal: auth.Principal, *, stream: bool) -> None:
        self._gate, self.conn, self.token, self.claims = gate, conn, token, claims
        self.principal = principal
        self.stream = stream
        self.room = ""  # a room stream: the room must stay allowed
        # A conversation stream (hold_conversation): what must stay true of the rights.
        self.keep: Callable[[auth.Principal], bool] | None = None
        self.stale = False  # decided before a change (key, settings, the tailnet's answer)
        self.error: TsnetchatError | None = None
        self._failed: asyncio.Future[None] | None = None
        self._on_fail: Callable[[TsnetchatError], None] | None = None
        self.expiry: asyncio.TimerHandle | None = None

    def fail(self, error: TsnetchatError) -> None:
        if self.error is not None:
            return
        self.error = error
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(None)
        if self._on_fail is not None:
            self._on_fail(error)

    def check(self) -> None:
        """Raise the reason this call may no longer run, if there is one."""
        if self.error is not None:
            raise self.error

    def failure(self) -> asyncio.Future[None]:
        """Done once the lease has failed."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
            if self.error is not None:
                self._failed.set_result(None)
        return self._failed

    def attach(self, on_fail: Callable[[TsnetchatError], None]) -> None:
        """Call ``on_fail(error)`` when the lease fails (at once if it already has)."""
        self._on_fail = on_fail
        if self.error is not None:
            on_fail(self.error)

    async def current(self) -> auth.Principal:
        """The rights as decided on current information: decided again first if something
        they were decided on changed since (the tailnet's answer, the key, the settings).
        Raises why the call may no longer run."""
        await self._gate.refresh(self)
        self.check()
        return self.principal

    async def hold_room(self, room: str) -> auth.Principal:
        """The rights to enter ``room`` now, decided on current information; from now on
        the lease fails if the room stops being allowed."""
        auth.check_room_name(room)
        auth.check_room(await self.current(), room)
        self.room = room
        return self.principal

    async def hold_conversation(self, keep: Callable[[auth.Principal], bool]
                                ) -> auth.Principal:
        """The caller's rights, decided on current information, for a private room or a
        direct conversation: their readers are their members (the servicer checks that,
        tsnetchat.rooms), not the token's rooms, so no room is held against the token.
        From now on the lease fails when rights decided again no longer pass ``keep`` (an
        admin reading others' conversations who is no longer an admin)."""
        await self.current()
        self.keep = keep
        return self.principal


class Gate:
    def __init__(self, tailnet: Tailnet, policy: Policy, *, revoked: Iterable[str] = (),
                 whois_timeout: float = 2.0, recheck_interval: float = 10.0) -> None:
        self._tailnet = tailnet
        self.policy = policy
        self.revoked: set[str] = set(revoked)
        self.whois_timeout = whois_timeout
        self.recheck_interval = recheck_interval
        self._conns: dict[str, _Conn] = {}
        self._leases: set[Lease] = set()
        self._slots = asyncio.Semaphore(WHOIS_SLOTS)
        self._guard_slots = asyncio.Semaphore(GUARD_SLOTS)
        self._conn_refusals = Buckets(*CONN_REFUSALS)
        self._node_refusals = Buckets(*NODE_REFUSALS)
        self._refusal_log = LogLimiter()
        self.hold = HOLD
        self._closed_log = LogLimiter()  # (its own count: "N more like this")
        # Every node id tailscaled has named as the server's own (``own_node``, at start;
        # ``tailnet_changed``): a node registered again gets a new one, while the old one
        # never comes back. And in cluster mode the other servers' (``other_servers``).
        self._own_nodes: set[str] = set()
        self._other_servers: frozenset[str] = frozenset()
        self._due = asyncio.Event()
        self.blind = True  # the IPN bus is not followed (yet): re-check every second
        # Counters for metrics.
        self.whois_calls = 0
        self.rechecks = 0
        self.throttled = 0
        self.lease_failures = 0

    # admission -------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, peer: str, metadata: Iterable[tuple[str, str | bytes]],
                    method: str, *, stream: bool = False) -> AsyncIterator[Lease]:
        """Admit a call for its whole duration (see the module doc for the order of checks).

        Raises Unauthenticated, PermissionDenied, LimitExceeded (refused unread), or
        LocalAPIUnavailable (tailscaled cannot answer). Refusals, also those raised by the
        caller's body (its LimitExceeded too: a rate), count against the connection's and
        the device's budget and are logged at most a few per second."""
        conn = self._enter(peer)
        lease: Lease | None = None
        try:
            await self._check_budget(conn, conn.node_id)
            token = auth.bearer_token(metadata)
            claims = self._verify(token)  # the cheap checks: no WhoIs yet
            if not conn.addr:
                raise Unauthenticated("tailnet lock: this connection is not an IP connection "
                                      "through tailscaled")
            who = await self._identity(conn)
            await self._check_budget(conn, who.node_id, asked=True)
            # Again after the wait: a revocation or a new key that came while WhoIs was asked
            # acts only on leases held, and nothing decided this one again (a stream opened
            # during a stalled WhoIs was still open 26 s after its token was revoked; an
            # attacker's run, 2026-11-24).
            claims = self._verify(token)
            lease = Lease(self, conn, token, claims, self._decide(who, claims), stream=stream)
            self._hold(lease)
            yield lease
        except (Unauthenticated, PermissionDenied, InvalidInput) as e:
            self._refused(conn, method, e)
            raise
        except LimitExceeded as e:
            # The body's (the person's call rate) counts; the gate's own, for a budget
            # spent, does not count again (``_check_budget``). Uncounted, each call past the
            # rate cost a WhoIs (the connection's identity goes with its last call) and a
            # whole gRPC call: a valid token's WhoAmI, one call after another on 64
            # connections, was refused 280 times a second and put alice's WhoAmI at p50
            # 180 ms, p99 0.39 s (5.7 and 16 ms without it; junk tokens, held: 5.9 and 31 ms).
            # Counted: p50 6.1 ms (over the lab, 2026-11-25).
            if lease is not None:
                self._refused(conn, method, e)
            raise
        finally:
            if lease is not None:
                self._release(lease)
            self._leave(conn)

    @asynccontextmanager
    async def identity(self, peer: str, method: str = "Login") -> AsyncIterator[WhoIs]:
        """The tailnet lock alone, for a call that carries no token yet (enrollment, see
        enroll.py): the connection's identity under the same refusal budget, cache and
        fail-closed rules as ``admit``. Refusals raised by the caller's body count too (its
        LimitExceeded too: a rate)."""
        conn = self._enter(peer)
        admitted = False
        try:
            await self._check_budget(conn, conn.node_id)
            if not conn.addr:
                raise Unauthenticated("tailnet lock: this connection is not an IP connection "
                                      "through tailscaled")
            who = await self._identity(conn)
            await self._check_budget(conn, who.node_id, asked=True)
            self._check_own_node(who)
            admitted = True
            yield who
        except (Unauthenticated, PermissionDenied, InvalidInput) as e:
            self._refused(conn, method, e)
            raise
        except LimitExceeded as e:
            # The body's (a device's logins or renewals, enroll.Enrollment._take) counts, as
            # in ``admit``; the gate's own does not count again. Uncounted, a Login flood
            # (enroll = off) was refused at once 465 times a second and put alice's WhoAmI at
            # p50 138 ms, p99 242 (5 and 9 without it); counted, 14 a second, p50 5.2 ms
            # (over the lab, 2026-11-25).
            if admitted:
                self._refused(conn, method, e)
            raise
        finally:
            self._leave(conn)

    async def refuse_unread(self, peer: str, method: str, error: TsnetchatError) -> None:
        """Charge a call refused before anything of it is read (a method this server does
        not have: ``server.Unknown``) to its connection's refusal budget, and to its device's
        if a call on the connection has learned it (no WhoIs is asked for it). Raises
        LimitExceeded after ``hold`` once a budget is spent, as ``admit`` does."""
        conn = self._enter(peer)
        try:
            await self._check_budget(conn, conn.node_id)
            self._refused(conn, method, error)
        finally:
            self._leave(conn)

    def check_token(self, who: WhoIs, token: str) -> auth.Principal:
        """Both locks for ``token`` from ``who``, as ``admit`` decides them (valid, not
        revoked, subject matches, grants narrow); for enrollment's renewal."""
        return self._decide(who, self._verify(token))

    def _enter(self, peer: str) -> _Conn:
        conn = self._conns.get(peer)
        if conn is None:
            try:
                host, port = parse_grpc_peer(peer)
            except ValueError:
                conn = self._conns[peer] = _Conn(peer, "")
            else:
                conn = self._conns[peer] = _Conn(peer, format_addr(host, port), _source(host))
        conn.refs += 1
        return conn

    def _leave(self, conn: _Conn) -> None:
        conn.refs -= 1
        if conn.refs == 0 and self._conns.get(conn.peer) is conn:
            del self._conns[conn.peer]

    async def _check_budget(self, conn: _Conn, node_id: str, *, asked: bool = False) -> None:
        """Refuse the call if its connection's, device's or address's refusal budget is
        spent, after ``hold`` seconds (HOLD says why; a client that stopped as told never
        waits). ``asked``: a WhoIs was spent to learn the device, and that refusal is
        charged to the connection, so that it too is soon refused before WhoIs. (The device
        is forgotten with the connection's last call: each call of a stolen token, refused
        one after the other on 64 connections, cost a WhoIs, 330 a second; other people's
        calls, waiting for WhoIs slots, took up to 2.5 s. An attacker's run over the lab,
        2026-11-25.)"""
        wait = max([self._conn_refusals.wait(conn.peer),
                    *(self._node_refusals.wait(k) for k in (node_id, conn.source) if k)])
        if wait:
            self.throttled += 1
            if asked:
                self._conn_refusals.take(conn.peer)
            await asyncio.sleep(self.hold)
            raise LimitExceeded(f"too many refused calls from this connection or device; "
                                f"{retry_in(wait)} and fix what the earlier refusals said")

    def _refused(self, conn: _Conn, method: str, e: TsnetchatError) -> None:
        self._conn_refusals.take(conn.peer)
        for key in (conn.node_id, conn.source):
            if key:
                self._node_refusals.take(key)
        # %r: names and reasons carry what clients and tailnet admins chose; escaped.
        self._refusal_log.log(log, logging.INFO, "refused method=%s peer=%s device=%r reason=%r",
                              method, conn.peer, conn.who.node_name if conn.who else "", str(e))

    def _verify(self, token: str) -> auth.Claims:
        claims = auth.verify_token(self.policy.key, token)
        if claims.token_id in self.revoked:
            raise _token_gone("this token has been revoked", claims.token_id)
        return claims

    def _decide(self, who: WhoIs, claims: auth.Claims) -> auth.Principal:
        self._check_own_node(who)
        grant = auth.grant_from_capmap(who.cap_map, self.policy.cap_name)
        return auth.authorize(who, claims, grant, require_grant=self.policy.require_grant,
                              logins_need_grant=self.policy.logins_need_grant)

    def _check_own_node(self, who: WhoIs) -> None:
        """Refuse the server's own node, under any node id it has had, and a cluster's other
        servers'. (Only the id the server read at start was refused: once the node was
        deleted and registered again, a process on the server going out through its
        tailscaled and back in was admitted as the node's user, and with ``enroll = any``
        got a token from Login; an attacker's run over the lab, 2026-11-25.)"""
        if self.policy.allow_own_node or not who.node_id:
            return
        if who.node_id in self._own_nodes:
            raise Unauthenticated(
                "tailnet lock: this connection comes from the server's own node (a process on "
                "the server going out through its tailscaled and back in), not from a "
                "person's device; set allow_own_node = true to let such bots in")
        if who.node_id in self._other_servers:
            raise Unauthenticated(
                "tailnet lock: this connection comes from the node of another server of this "
                "chat cluster (a process there going out through its tailscaled), not from a "
                "person's device; set allow_own_node = true to let such bots in")

    async def identify(self, addr: str) -> WhoIs:
        """The tailnet lock alone, for a connection gRPC does not serve (the metrics
        endpoint): who is behind ``addr``, if it came through tailscaled from a device other
        than ours. Raises Unauthenticated or LocalAPIUnavailable."""
        try:
            who = await asyncio.wait_for(self._lookup(addr), self.whois_timeout)
        except (TailnetError, TimeoutError) as e:
            raise self._translate(_Conn("", addr), e) from None
        self._check_own_node(who)
        return who

    # identity --------------------------------------------------------------------------

    async def _lookup(self, addr: str) -> WhoIs:
        async with self._slots:
            self.whois_calls += 1
            return await self._tailnet.whois(addr)

    async def _identity(self, conn: _Conn) -> WhoIs:
        """The connection's WhoIs, asked again if a change may concern the cached answer."""
        for _ in range(3):
            task = conn.lookup
            if task is None or conn.stale:
                if conn.stale:
                    # Its leases were decided on the answer now stale: they are decided again
                    # on this one (``_recheck``). A call that asked first took the flag, and
                    # the Join on its connection was never decided again: a narrowed grant
                    # went on sending for 75 s (a daily user's run, 2026-11-24).
                    for lease in conn.leases:
                        lease.stale = True
                    self._due.set()
                conn.stale = False
                task = conn.lookup = asyncio.ensure_future(
                    asyncio.wait_for(self._lookup(conn.addr), self.whois_timeout))
                task.add_done_callback(_retrieve)
            try:
                who = await asyncio.shield(task)
            except (TailnetError, TimeoutError) as e:
                if conn.lookup is task:
                    conn.lookup = None  # the next call asks again
                raise self._translate(conn, e) from None
            if conn.stale or conn.lookup is not task:
                continue  # a change arrived while we asked: ask again
            if conn.node_id and who.node_id != conn.node_id:
                raise Unauthenticated("tailnet lock: tailscaled now names another device "
                                      "behind this connection")
            conn.node_id, conn.who = who.node_id, who
            return who
        raise LocalAPIUnavailable("cannot verify your tailnet identity: the tailnet kept "
                                  "changing while it was checked; try again")

    @staticmethod
    def _translate(conn: _Conn, e: BaseException) -> TsnetchatError:
        if isinstance(e, PeerNotFound):
            if conn.node_id:
                return Unauthenticated("tailnet lock: tailscaled no longer knows the device "
                                       "behind this connection (removed from the tailnet?)")
            return Unauthenticated(
                "tailnet lock: this connection did not come through tailscaled (WhoIs has no "
                "match for it); connect over the tailnet")
        if isinstance(e, TimeoutError):
            return LocalAPIUnavailable("cannot verify your tailnet identity: tailscaled did "
                                       "not answer WhoIs in time; try again")
        return LocalAPIUnavailable(f"cannot verify your tailnet identity: {e}")

    # leases ----------------------------------------------------------------------------

    def _hold(self, lease: Lease) -> None:
        self._leases.add(lease)
        lease.conn.leases.add(lease)
        delay = lease.claims.expires_at + auth.LEEWAY - time.time()
        lease.expiry = asyncio.get_running_loop().call_later(
            max(0.0, delay) + 0.01, self._fail, lease,
            _token_gone("the token has expired", lease.claims.token_id))

    def _release(self, lease: Lease) -> None:
        self._leases.discard(lease)
        lease.conn.leases.discard(lease)
        if lease.expiry is not None:
            lease.expiry.cancel()
        lease.attach(lambda _e: None)

    def _fail(self, lease: Lease, error: TsnetchatError) -> None:
        if lease.error is not None:
            return
        self.lease_failures += 1
        lease.fail(error)
        if lease.stream:
            who = lease.conn.who
            self._closed_log.log(log, logging.INFO, "closed a stream of %r on device %r: %r",
                                  lease.principal.login, who.node_name if who else "",
                                  str(error))

    def _redecide(self, lease: Lease, who: WhoIs) -> None:
        if lease.error is not None:
            return
        try:
            p = self._decide(who, self._verify(lease.token))
            if lease.room and not p.may_use(lease.room):
                allowed = ("any room" if auth.ALL_ROOMS in p.rooms
                           else ", ".join(sorted(p.rooms)))
                raise PermissionDenied(f"the tailnet policy changed: you may no longer use room "
                                       f"{lease.room!r} (allowed now: {allowed})")
            if lease.keep is not None and not lease.keep(p):
                raise PermissionDenied("your rights changed: you may no longer read this "
                                       "conversation")
        except TsnetchatError as e:
            self._fail(lease, e)
            return
        lease.principal, lease.stale = p, False

    async def refresh(self, lease: Lease) -> None:
        """Decide ``lease`` again now if anything changed since it was decided."""
        if lease.error is None and (lease.stale or lease.conn.stale):
            try:
                who = await self._identity(lease.conn)
            except TsnetchatError as e:
                self._fail(lease, e)
                return
            self._redecide(lease, who)

    def streams_of(self, token_id: str) -> set[Lease]:
        """The streams of ``token_id`` open here now (leases not failed)."""
        return {lease for lease in self._leases
                if lease.stream and lease.error is None and lease.claims.token_id == token_id}

    def revoke(self, token_ids: Iterable[str]) -> int:
        """Refuse these tokens from now on; fail their leases. Returns the streams closed."""
        ids = set(token_ids)
        self.revoked |= ids
        victims = [lease for lease in self._leases
                   if lease.claims.token_id in ids and lease.error is None]
        for lease in victims:
            self._fail(lease, _token_gone("your token was revoked", lease.claims.token_id))
        return sum(lease.stream for lease in victims)

    def apply(self, policy: Policy) -> None:
        """New key or settings: every lease is decided again within a second."""
        if policy == self.policy:
            return
        self.policy = policy
        self._decide_all_again()

    def own_node(self, node_id: str) -> None:
        """``node_id`` (a StableID) is the server's node: its connections are refused from
        now on (unless ``allow_own_node``), and it stays refused after the node is
        registered again under another."""
        if node_id and node_id not in self._own_nodes:
            if self._own_nodes:
                log.warning("this server's node is now %r (registered again on the tailnet); "
                            "connections from it are refused as from the server's own node",
                            node_id)
            self._own_nodes.add(node_id)
            self._decide_all_again()

    def other_servers(self, node_ids: Iterable[str]) -> None:
        """The nodes (StableIDs) of the other servers of a chat cluster, as the cluster lists
        them now (``ClusterHistory.server_nodes``): refused as this server's own is (unless
        ``allow_own_node``). Only this server's own was: a process on chat-server-2 going out
        through its tailscaled to server 1 was admitted as the node's user, and with
        ``enroll = any`` got a token (an attacker's run, 2026-11-25)."""
        ids = frozenset(n for n in node_ids if n)
        if ids != self._other_servers:
            added = ids - self._other_servers
            self._other_servers = ids
            if added:
                self._decide_all_again()

    def _decide_all_again(self) -> None:
        for lease in self._leases:
            lease.stale = True
        self._due.set()

    def tailnet_changed(self, change: Change) -> None:
        """tailscaled announced a change: ask again about every connection it may concern,
        and end the calls of devices that went offline."""
        self.blind = False
        self.own_node(change.self_node)
        self._mark(change)
        if change.offline:
            for conn in list(self._conns.values()):
                if conn.who is not None and conn.who.node_num in change.offline:
                    for lease in list(conn.leases):
                        self._fail(lease, Unavailable(OFFLINE))

    def tailnet_lost(self) -> None:
        """The IPN bus is lost: changes may go unannounced. Ask again about everyone now
        (failing them if tailscaled cannot answer), then every second until it is back."""
        self.blind = True
        self._mark(Change(everything=True))

    def _mark(self, change: Change) -> None:
        for conn in self._conns.values():
            if change.everything or not conn.node_id or conn.node_id in change.nodes:
                conn.stale = True
        self._due.set()

    # the re-checking task --------------------------------------------------------------

    async def run(self) -> None:
        """Decide stale leases again as soon as they are stale, and probe every device with
        leases every ``recheck_interval`` seconds (every second while blind). Runs until
        cancelled."""
        loop = asyncio.get_running_loop()
        last_probe = loop.time()
        errors = LogLimiter(burst=3, rate=0.1)
        while True:
            interval = BLIND_INTERVAL if self.blind else self.recheck_interval
            wait = last_probe + interval - loop.time()
            if wait > 0 and not self._due.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._due.wait(), min(wait, BLIND_INTERVAL))
            try:
                if loop.time() - last_probe >= interval:
                    last_probe = loop.time()
                    await self._probe()
                if self._due.is_set():
                    await asyncio.sleep(SETTLE)
                    self._due.clear()
                    await self._recheck()
            except Exception as e:  # a bug here must not end re-checking for good
                errors.log(log, logging.ERROR, "re-checking leases failed; trying again",
                           exc_info=e)
                self._due.set()
                await asyncio.sleep(BLIND_INTERVAL)

    async def _probe(self) -> None:
        """Ask about one connection per device with leases; if the answer differs (or there
        is none), every connection of that device is stale."""
        by_node: dict[str, list[_Conn]] = {}
        for c in self._conns.values():
            if c.leases and c.who is not None and not c.stale:
                by_node.setdefault(c.node_id, []).append(c)

        async def probe(conns: list[_Conn]) -> None:
            try:
                who: WhoIs | None = await asyncio.wait_for(self._lookup(conns[0].addr),
                                                           self.whois_timeout)
            except (TailnetError, TimeoutError):
                who = None
            if who is None or who != conns[0].who:
                for c in conns:
                    c.stale = True
                self._due.set()

        await asyncio.gather(*(probe(cs) for cs in by_node.values()))

    async def _recheck(self) -> None:
        conns = [c for c in self._conns.values()
                 if c.leases and (c.stale or any(lease.stale for lease in c.leases))]

        async def recheck(conn: _Conn) -> None:
            try:
                who = await self._identity(conn)
            except TsnetchatError as e:
                for lease in list(conn.leases):
                    self._fail(lease, e)
                return
            for lease in list(conn.leases):
                self._redecide(lease, who)

        await asyncio.gather(*(recheck(c) for c in conns))
        self.rechecks += 1

    def leases(self) -> int:
        return len(self._leases)

    # for the connection guard (connguard.py) ---------------------------------------------

    def connection_count(self) -> int:
        """How many connections have calls now."""
        return len(self._conns)

    def connections(self) -> dict[tuple[str, int], Device]:
        """The device of each connection with calls whose device is known: (host, port), as
        ``connguard.remote`` spells it, -> the device (its node id, and its name)."""
        out = {}
        for conn in self._conns.values():
            if conn.who is not None:
                with contextlib.suppress(ValueError):
                    out[remote(*parse_grpc_peer(conn.peer))] = _device(conn.who)
        return out

    @asynccontextmanager
    async def device_behind(self, peer: str) -> AsyncIterator[str]:
        """The node id of the device behind gRPC's ``peer``, for a call with no token (a
        health Watch), held for the call's life: the connection's WhoIs if a call has it,
        else asked (``GUARD_SLOTS`` at a time, as ``device``: tokenless calls must not keep
        people's admissions waiting for WhoIs; a review, 2026-11-25), kept for the other
        calls on the connection while this one is held. "" when tailscaled does not know
        the peer (a process on this machine); ``UNANSWERED`` when it does not answer, or
        fails: one device for all of those. Never raises for that: the caller decides."""
        conn = self._enter(peer)
        try:
            if conn.who is not None and not conn.stale:
                device = conn.who.node_id
            elif not conn.addr:
                device = ""
            else:
                who = await self._guarded_whois(conn.addr)
                if who is None:
                    device = UNANSWERED
                elif who is False:
                    device = ""
                else:
                    device = who.node_id
                    if not conn.node_id:
                        conn.node_id, conn.who = who.node_id, who
            yield device
        finally:
            self._leave(conn)

    async def device(self, addr: str) -> Device | None:
        """The device behind ``addr`` (its node id, and its name); ``connguard.UNKNOWN``
        when tailscaled does not know it, None when it does not answer in time.
        ``GUARD_SLOTS`` at a time, apart from the calls' ``WHOIS_SLOTS``: a burst of these
        must not keep people's calls waiting."""
        who = await self._guarded_whois(addr)
        if who is None or who is False:
            return None if who is None else UNKNOWN
        return _device(who)

    async def _guarded_whois(self, addr: str) -> WhoIs | Literal[False] | None:
        """WhoIs of ``addr``, ``GUARD_SLOTS`` at a time (``device``, ``device_behind``):
        False when tailscaled does not know it, None when it does not answer in time."""
        async with self._guard_slots:
            try:
                who = await asyncio.wait_for(self._tailnet.whois(addr), self.whois_timeout)
            except PeerNotFound:
                return False
            except (TailnetError, TimeoutError):
                return None
        self.whois_calls += 1
        return who


def _source(host: str) -> str:
    """The refusal budget of a connection's address, shared by the device's connections
    before any of them is asked WhoIs: ``address <ip>`` for a tailnet address, which on a
    TUN node is the device's own; "" for loopback, where every connection tailscaled
    forwards in userspace mode comes from, whatever its device. (Without it, a connection's
    refusals were charged to its device only once WhoIs had named it, and a junk token
    costs no WhoIs: each new connection had a fresh budget of 10 refusals answered at once.
    A new connection for each junk call, 32 at once, was answered 650-710 times a second
    and put alice's WhoAmI at p50 10-12 ms, p99 85-118; with it, once a second and 6.4 held,
    p50 4.5-6 ms, p99 22-81. A TUN node over the lab, 2026-11-25.)"""
    try:
        ip = ipaddress.ip_address(remote(host, 0)[0])
    except ValueError:
        return ""
    return "" if ip.is_loopback else f"address {ip}"


def _device(who: WhoIs) -> Device:
    return Device(who.node_id, f"{who.node_name or who.node_id} ({who.login})")


def _retrieve(task: asyncio.Task[WhoIs]) -> None:
    """A lookup nobody waits for any more must not log 'exception never retrieved'."""
    if not task.cancelled():
        task.exception()
