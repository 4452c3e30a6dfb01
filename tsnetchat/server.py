"""The daemon's lifecycle: assemble -> start -> serve -> stop(grace).

``Server(cfg, tailnet=...)`` assembles the parts in order, each given what it needs: the
state dir made private, the signing key, the store, the gate (over the given ``Tailnet``:
the real ``LocalAPI`` in production, a stand-in in tests of pure chat logic, the same start-up
either way), the hub and the servicer (in cluster mode wired to the cluster both ways:
``Elsewhere``, ``Server._hear``). Construct it in the event loop that will run it.
``Server.start`` waits until tailscaled is up, picks the listen addresses (tailnet IPs with a
TUN device; loopback in userspace mode, where tailscaled delivers tailnet traffic), and only
then binds and reports READY; what it learned and made is one value (``Serving``). Background
tasks follow tailscaled's IPN bus (the gate's changes, new addresses, our node registered
again), re-decide leases (``Gate.run``), pick up revocations, a rotated key written by the
CLI and (cluster mode) the other servers' nodes, and apply retention. ``Server.stop`` stops
accepting, tells streams the server is going away, waits up to the grace period, and closes
the store. Signals only set events (see ``serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from . import auth, enroll
from .cluster import ClusterHistory
from .config import DEFAULT_PORT, SINGLE_DB, Limits, ServerConfig, parse_listen, settings
from .connguard import ConnectionGuard, Remote, raise_file_limit, remote
from .errors import (
    ConfigError,
    InvalidInput,
    LimitExceeded,
    StoreError,
    TailnetError,
    TsnetchatError,
)
from .gate import Gate, Policy
from .hub import Hub, Pacing
from .loop import (
    Collector,
    LoopLoad,
    batch_grpc_wakeups,
    cancel_all,
    freeze_startup_heap,
    yield_helper_threads,
)
from .metrics import Metrics
from .notify import Notifier
from .pb import chat_pb2 as pb
from .service import SERVICE_NAME, ChatService, Elsewhere
from .statedir import StateLock, read_key, secure_state_dir
from .store import MAX_GROUP, SqliteHistory, Store, damaged, quick_check
from .tailnet import LocalAPI, Status, Tailnet, format_addr, wait_running
from .throttle import Buckets, TokenBucket, retry_in

log = logging.getLogger("tsnetchat.server")

CHECK_AT_START = 60.0  # seconds the start-up quick_check may run (then it is not judged)

# Health.Watch and reflection streams need no token (probes and tools have none). A held
# Health.Watch cost about 21 KB (3,000 from plain loopback took the server from 70 to
# 132 MiB; issue 14, 2026-11-22), so each kind is bounded per connection and in all; and
# per tailnet device, since one device with no token held all 64 Watches, on 16
# connections (an attacker's run over the lab, 2026-11-24). A connection tailscaled does
# not know (a process on the server's machine, in userspace mode) has no device bound.
MAX_OPEN_STREAMS = 64
MAX_OPEN_STREAMS_PER_CONNECTION = 4
MAX_OPEN_STREAMS_PER_DEVICE = 8

# Health.Check calls one connection may make (burst, then per second) before each of its
# Checks is answered after ``Gate.hold``: a probe makes one now and then (doctor: one). Checks
# need no token, and answered at once, 2,819 a second on 64 connections put alice's WhoAmI
# at p50 8.1 ms, p99 39 (5.0 and 6.7 without them); held, 75 a second, p50 4.7, p99 21, the
# loop's CPU a fifth (over the lab, 2026-11-25). A device's held Checks wait on its own
# connections' stream limit, as the gate's held refusals do. Counted per connection only: the
# device behind one costs a WhoIs per call when nothing else on it is in progress
# (``Gate.device_behind``), and a device's connections are bounded (connguard).
CHECKS = (5, 1.0)

# Requests one reflection stream may send (burst, then per second) before it is ended after
# ``Gate.hold``: grpcurl's `describe` of the whole API asks about 10. They need no token, and
# 8 streams pumping file_containing_symbol had 8,669 answers a second and put alice's WhoAmI
# at p50 47 ms, p99 787 (4.1 and 7.6 without them); ended, 47 a second, p50 6.4, p99 127
# (over the lab, 2026-11-25; the rest is mostly what a client writes ahead while held).
REFLECTION_PACE = (32, 10.0)

# Metrics requests answered a second (and at once) from one address, before the tailnet lock
# asks WhoIs: every request cost a LocalAPI call, and 280 a second from a device with no
# grant took alice's WhoAmI from 4 to 126 ms (p99 412; an attacker's run over the lab,
# 2026-11-25). On a TUN node each device has its own budget; in userspace mode every
# caller's address is loopback and one budget is everyone's, so a flood can keep a scraper
# out, not slow the chat. (A budget per device after WhoIs, 5 then one a second, each 429
# past it held 5 s, was tried the same day: the bench's own poll of the server's counters,
# 10 a second, was refused and held.)
METRICS_BURST, METRICS_RATE = 20, 5.0
# Connections to the metrics port open at once from one address, and in all: each waits up to
# METRICS_READ seconds for its request, and more are answered 429 at once. Asked only once
# the request came, the budget above let a device that opened connections and sent nothing
# hold as many as it opened, each a file of the server's, whose limit is every connection's
# (a review, 2026-11-25). A scraper uses one at a time.
METRICS_OPEN_PER_ADDRESS, METRICS_OPEN = 4, 64
METRICS_READ = 5.0

KEEPALIVE_TIME_MS = 4_000
KEEPALIVE_TIMEOUT_MS = 4_000

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_metadata_size", 16 * 1024),
    # Presence must tell the truth: a peer that vanished without closing (a killed
    # tailscaled, a laptop lid, a cut network) still has an open TCP connection here, and in
    # userspace mode that connection is to our own tailscaled, which keeps it open for as
    # long as its netstack retries. Only an unanswered HTTP/2 PING shows it: one after
    # KEEPALIVE_TIME_MS without anything read, the connection closed (its streams "left")
    # KEEPALIVE_TIMEOUT_MS later. Since grpc core's PR 34647 the wait for the PING's answer
    # is grpc.http2.ping_timeout_ms (default 60 s; with keepalive_timeout_ms alone a frozen
    # client stayed a member for as long as we watched, grpcio 1.85.1, 2026-11-22). Without
    # max_pings_without_data = 0, core stops pinging a quiet stream after two pings. The IPN
    # bus says "offline" too, but only ~10 s after the node died (headscale v0.29.2,
    # measured in the lab 2026-11-22): gate.tailnet_changed.
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Clients ping us too (discovery.CHANNEL_OPTIONS, every 10 s): accept pings this often
    # without data, with room for timer jitter; faster ones are strikes (GOAWAY after 2).
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
    # gRPC's core parks a new call in a "pending" queue until the application asks for it;
    # grpc.aio asks for one call at a time from the event loop, so a burst of clients
    # (everyone reconnecting after a restart) fills that queue fast. Past its defaults
    # (1,000 soft, 3,000 hard) core drops calls at random, and the dropped clients see a bare
    # CANCELLED: 3,000 simultaneous Subscribe calls lost 400-700 even on a trivial grpc.aio
    # server (found with bench/loadgen-go; tests/test_limits.py has the burst). Flooding is
    # bounded by our own per-login call limit instead.
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 200_000),
]


def streams_per_connection(limits: Limits) -> int:
    """Calls one connection may carry at once (HTTP/2's MAX_CONCURRENT_STREAMS; a client's
    further calls wait for one to end, they are not refused): a person's open rooms twice
    over (their streams, and the calls made beside them), at least 32, at most 1,024.

    Every call gRPC holds costs about 16 KB before its request is read, and nothing of ours
    runs until it is: with 256, one device without a token held 8,192 calls that never sent
    one (270 MB), and 1,200 refused calls queued ahead of everyone else's made another
    person's WhoAmI take 245 ms instead of 2 (attacker runs over the lab and in-process,
    2026-11-25). A device holds at most max_connections_per_device connections."""
    return min(max(32, 2 * limits.max_rooms_per_client), 1024)


def listen_addresses(status: Status) -> list[str]:
    """Where tailnet traffic arrives: the node's tailnet IPs on a TUN device; in userspace
    mode tailscaled re-dials every inbound tailnet connection (v4 and v6) to 127.0.0.1."""
    if status.tun:
        ips = [ip for ip in status.ips if not ipaddress.ip_address(ip).is_unspecified]
        if not ips:
            raise TailnetError("tailscaled reports a TUN device but no tailnet addresses")
        return ips
    return ["127.0.0.1"]


# What a reload (SIGHUP) applies; every other key of ServerConfig needs a restart.
RELOADABLE = frozenset({f.name for f in dataclasses.fields(Limits)} | {
    "retention_count", "retention_days", "require_grant", "cap_domain", "allow_own_node",
    "enroll", "enroll_ttl_hours", "token_ttl_hours"})


def policy_for(cfg: ServerConfig, key: bytes) -> Policy:
    return Policy(key=key, cap_name=cfg.cap_name, require_grant=cfg.require_grant,
                  logins_need_grant=cfg.enroll != "any", allow_own_node=cfg.allow_own_node)


@dataclasses.dataclass(frozen=True)
class Serving:
    """What ``Server.start`` learns and makes, whole at once: what tailscaled said of this
    server's node, the addresses listened on and the port on each, and the gRPC server bound
    there. Replaced whole when the addresses change (``Server._maybe_rebind``) and when the
    node is registered again (``Server._follow_node``)."""

    status: Status
    addresses: list[str]
    ports: list[int]
    grpc: grpc.aio.Server


# The device behind a peer, held for a stream's life (``Gate.device_behind``).
DeviceOf = Callable[[str], contextlib.AbstractAsyncContextManager[str]]


class StreamBound:
    """At most MAX_OPEN_STREAMS_PER_CONNECTION streams of one kind per connection,
    MAX_OPEN_STREAMS_PER_DEVICE per tailnet device (``device``: the node id behind a peer,
    "" for none; ``Gate.device_behind``), and MAX_OPEN_STREAMS in all; one more is refused
    (RESOURCE_EXHAUSTED, naming the bound)."""

    def __init__(self, what: str, device: DeviceOf) -> None:
        self.what = what
        self._device = device
        self._open: Counter[str] = Counter()
        self._by_device: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def hold(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        peer = context.peer()
        await self._check(context, peer, "")
        async with self._device(peer) as device:  # (after the cheap bounds: no WhoIs)
            await self._check(context, peer, device)  # (again: others came in meanwhile)
            self._open[peer] += 1
            self._by_device[device] += 1
            try:
                yield
            finally:
                for counts, key in ((self._open, peer), (self._by_device, device)):
                    counts[key] -= 1
                    if not counts[key]:
                        del counts[key]

    async def _check(self, context: grpc.aio.ServicerContext, peer: str, device: str
                     ) -> None:
        """Refuse the stream if a bound is reached, naming that bound."""
        if self._open.total() >= MAX_OPEN_STREAMS:
            bound = f"{MAX_OPEN_STREAMS} in all"
        elif self._open[peer] >= MAX_OPEN_STREAMS_PER_CONNECTION:
            bound = f"{MAX_OPEN_STREAMS_PER_CONNECTION} per connection"
        elif device and self._by_device[device] >= MAX_OPEN_STREAMS_PER_DEVICE:
            bound = f"{MAX_OPEN_STREAMS_PER_DEVICE} per device"
        else:
            return
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"too many open {self.what} (at most {bound})")


class BoundedHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """gRPC's health service, with Watch streams bounded, and a connection's Checks past
    CHECKS answered after ``hold()`` seconds (``Gate.hold``)."""

    def __init__(self, device: DeviceOf, hold: Callable[[], float]) -> None:
        super().__init__()
        self._bound = StreamBound("health watches; use Check", device)
        self._checks = Buckets(*CHECKS)
        self._hold = hold

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._checks.take(context.peer()):
            await asyncio.sleep(self._hold())
        return await super().Check(request, context)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        async with self._bound.hold(context):
            await super().Watch(request, context)


class BoundedReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """gRPC's reflection service, with its streams bounded, and each ended after ``hold()``
    seconds (``Gate.hold``) once it asks faster than ``pace`` (burst, then per second;
    REFLECTION_PACE)."""

    def __init__(self, service_names: tuple[str, ...], device: DeviceOf,
                 hold: Callable[[], float]) -> None:
        super().__init__(service_names)
        self._bound = StreamBound("reflection streams", device)
        self._hold = hold
        self.pace = REFLECTION_PACE

    async def ServerReflectionInfo(self, request_iterator: Any,
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with self._bound.hold(context):
            paced = self._paced(request_iterator, TokenBucket(*self.pace))
            try:
                async for response in super().ServerReflectionInfo(paced, context):
                    yield response
            except LimitExceeded as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    async def _paced(self, requests: AsyncIterator[Any], bucket: TokenBucket
                     ) -> AsyncIterator[Any]:
        """``requests`` while they come within ``bucket``; then, after the hold, the
        stream's end. (Read more slowly instead, they still came: a client writes ahead as
        far as HTTP/2 flow control lets it, and 8 paced streams put alice's p99 at 415 ms.)"""
        async for request in requests:
            if bucket.take():
                await asyncio.sleep(self._hold())
                burst, rate = self.pace
                raise LimitExceeded(f"too many reflection requests on one stream (at most "
                                    f"{burst}, then {rate:g} a second); open another")
            yield request


class Scrapes:
    """Prometheus text, behind the tailnet lock: only connections that come through
    tailscaled from a device (not this server's own node, unless allow_own_node) get an
    answer; anything else is closed with 403; beyond ``METRICS_RATE`` from an address, or
    more than ``METRICS_OPEN_PER_ADDRESS`` connections open from one, 429."""

    def __init__(self, gate: Gate, metrics: Metrics) -> None:
        self.gate, self.metrics = gate, metrics
        self._by_address = Buckets(METRICS_BURST, METRICS_RATE)
        self._open: Counter[str] = Counter()  # connections open, by address

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP request on its own connection (``asyncio.start_server``'s callback)."""
        with contextlib.suppress(Exception):
            host, port = writer.get_extra_info("peername")[:2]
            if (self._open[host] >= METRICS_OPEN_PER_ADDRESS
                    or self._open.total() >= METRICS_OPEN):
                _reply(writer, b"429 Too Many Requests", (
                    f"too many open metrics connections (at most {METRICS_OPEN_PER_ADDRESS} "
                    f"from one address, {METRICS_OPEN} in all); send the request at once, "
                    "one scrape at a time\n").encode())
            else:
                self._open[host] += 1
                try:
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), METRICS_READ)
                    body, status = await self._answer(host, format_addr(host, port))
                    _reply(writer, status, body)
                finally:
                    self._open[host] -= 1
                    if not self._open[host]:
                        del self._open[host]
            await writer.drain()
        writer.close()

    async def _answer(self, host: str, peer: str) -> tuple[bytes, bytes]:
        wait = self._by_address.take(host)
        if wait:
            return (f"too many metrics requests (at most {METRICS_RATE:g} a second from one "
                    f"address); {retry_in(wait)}\n").encode(), b"429 Too Many Requests"
        try:
            await self.gate.identify(peer)
        except TsnetchatError as e:
            return f"{e}\n".encode(), b"403 Forbidden"
        return self.metrics.render_prometheus().encode(), b"200 OK"


def _reply(writer: asyncio.StreamWriter, status: bytes, body: bytes) -> None:
    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                 b"Content-Length: " + str(len(body)).encode() +
                 b"\r\nConnection: close\r\n\r\n" + body)


class Unknown(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The last handler: a call to a method no other handler serves is answered
    UNIMPLEMENTED, as gRPC answers it, but counted against its connection's refusal budget
    (``Gate.refuse_unread``) and held once that is spent. gRPC's own answer needed nothing
    of ours, so nothing slowed it: 2,619 such calls a second on 64 connections put alice's
    WhoAmI at p50 26 ms, p99 149 (5 and 10 without them); counted, 94 a second, p50 4.7 ms,
    p99 33 (over the lab, 2026-11-25)."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler | None:
        name: str | bytes = handler_call_details.method
        method = name.decode("utf-8", "replace") if isinstance(name, bytes) else name

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            words = (f"this server has no method {method[:200]!r}; is it a tsnetchat "
                     "server, and as new as this client?")
            try:
                await self._gate.refuse_unread(context.peer(), method, InvalidInput(words))
            except LimitExceeded as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, words)

        # A stream both ways, never read: it fits a call of any kind.
        return grpc.stream_stream_rpc_method_handler(refuse)


def _elsewhere(cluster: ClusterHistory) -> Elsewhere:
    """The servicer's hooks into the other servers of ``cluster``."""
    return Elsewhere(
        servers=lambda: [pb.ClusterServer(name=n, port=p, node_id=cluster.server_nodes.get(n, ""))
                         for n, p in sorted(cluster.servers.items())],
        kick=cluster.kick, members=cluster.members, share_presence=cluster.share_presence)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns  # (ctime: a chown or chmod as well)


class Server:
    def __init__(self, cfg: ServerConfig, *, tailnet: Tailnet,
                 notifier: Notifier | None = None,
                 progress: Callable[[str], None] | None = None,
                 pacing: Pacing | None = None, owns_process: bool = False) -> None:
        self.cfg = cfg
        self.tailnet = tailnet
        # The daemon's server may tune the whole process (thread scheduling, the collector)
        # once started; tests run several servers in one process and leave it alone.
        self.owns_process = owns_process
        self.notifier = notifier or Notifier()
        self.progress = progress or (lambda m: log.info("%s", m))
        secure_state_dir(cfg.state_dir, (cfg.db_path,))
        for name in cfg.secrets_open_to_others():
            log.warning("%s: other users of this machine can read it; keep it in a systemd "
                        "credential or a file only the server reads (README, Configuration)",
                        cfg.where(name))
        # Held until stop(): `tsnetchat restore` refuses to run under a live server.
        self._lock = StateLock(cfg.state_dir, "server")
        single = cfg.state_dir / SINGLE_DB
        if cfg.cluster and single.is_file():
            # (a server moved to cluster mode served empty rooms without a word, its history
            # left in this file: an operator's run, 2026-11-25)
            log.warning("cluster mode: %s holds the history this server had before cluster "
                        "mode; the cluster does not serve it and nothing copies it in, so "
                        "clients see the cluster's history instead (and tokens signed with "
                        "this server's old key stop working unless it became the cluster's). "
                        "Start the server without `cluster` to serve it again", single)
        new_key = False
        try:
            new_key = auth.create_key(cfg.key_path)  # (True only if this start made it)
            key = read_key(cfg.key_path)  # refuses an open key file
            self._key_stamp = _stamp(cfg.key_path)
            # Opening (creating or upgrading) the database is start-up work: nothing is
            # served yet, so the loop may wait for it here. From now on it runs on its own
            # threads.
            db = Store(cfg.db_path, fsync=cfg.fsync, timeout=cfg.store_wait)
            revoked, self._revocation_seq = db.revocations_since(0)
            lost = db.live_tokens() if new_key and not cfg.cluster else 0
            if lost:  # (said nowhere, every token refused: an operator's run, 2026-11-24)
                log.warning("made a new signing key %s, but %d unexpired token(s) were issued "
                            "with one before: they no longer work. If the key was lost by "
                            "mistake, stop the server and put it back; else issue them again "
                            "(tsnetchat token list)", cfg.key_path, lost)
            elif new_key and not cfg.cluster:
                # (a server started by mistake with another state dir refused every token
                # without a word in the journal as to why: a new user's day, 2026-11-24)
                log.info("made a new signing key %s: tokens signed with any other key are "
                         "refused. On a first start that is expected; if this server ran "
                         "before, check --state-dir (now %s)", cfg.key_path, cfg.state_dir)
        except BaseException:
            if new_key:  # (a start refused for its database left a new key behind, which
                # the next start took as the server's own: a newcomer, 2026-11-24)
                with contextlib.suppress(OSError):
                    cfg.key_path.unlink()
            self._lock.release()
            raise
        local = SqliteHistory(db, asyncio.get_running_loop(), wait=cfg.store_wait,
                              max_group=max(1, min(MAX_GROUP, cfg.subscriber_queue // 4)))
        self.gate = Gate(tailnet, policy_for(cfg, key), revoked=revoked,
                         whois_timeout=cfg.whois_timeout, recheck_interval=cfg.recheck_interval)
        self.load = LoopLoad(asyncio.get_running_loop())
        self.hub = Hub(pacing, load=self.load)
        local.linger = lambda: self.hub.pacing.commit_linger(self.load())
        # Cluster mode: the same service on a NATS JetStream cluster; ``local`` becomes this
        # server's copy of the cluster's stream (tsnetchat.cluster).
        self.store: SqliteHistory | ClusterHistory = (
            ClusterHistory(local, cfg) if cfg.cluster else local)
        self.metrics = Metrics()
        self.enrollment = enroll.Enrollment(
            door=self.gate, key=lambda: self.gate.policy.key, store=self.store,
            policy=enroll.policy_from(cfg),  # named once start() knows our name
            server_node=lambda: self.serving.status.self_node)
        cluster = self.store if isinstance(self.store, ClusterHistory) else None
        self.service = ChatService(
            store=self.store, hub=self.hub, gate=self.gate, tailnet=tailnet, limits=cfg.limits,
            metrics=self.metrics, enrollment=self.enrollment,
            elsewhere=Elsewhere() if cluster is None else _elsewhere(cluster))
        if cluster is not None:
            self._hear(cluster)
        gate = self.gate
        self.health = BoundedHealth(gate.device_behind, lambda: gate.hold)
        self.reflection = BoundedReflection((
            pb.DESCRIPTOR.services_by_name["Chat"].full_name, health.SERVICE_NAME,
            reflection.SERVICE_NAME), gate.device_behind, lambda: gate.hold)
        self.guard = ConnectionGuard(cfg.max_connections_per_device, gate.connections,
                                     gate.device, gate.connection_count)
        self.scrapes = Scrapes(gate, self.metrics)  # (served on metrics_port, if set)
        for name, fn in [("subscribers", lambda: float(self.hub.counts()[1])),
                         ("leases", lambda: float(gate.leases())),
                         ("whois_lookups_total", lambda: float(gate.whois_calls)),
                         ("rechecks_total", lambda: float(gate.rechecks)),
                         ("lease_failures_total", lambda: float(gate.lease_failures)),
                         ("refusals_throttled_total", lambda: float(gate.throttled)),
                         ("connections_closed_total", lambda: float(self.guard.closed)),
                         # (how much group commit gathers: messages per commit; nothing
                         # showed it, a reliability run, 2026-11-25)
                         ("store_commits_total", lambda: float(local.commits)),
                         ("store_committed_messages_total", lambda: float(local.committed)),
                         ("loop_busy", lambda: self.load.value)]:
            self.metrics.gauge(name, fn)
        self._serving: Serving | None = None  # (start)
        # What the connection guard sweeps, and the metrics listeners (and the addresses
        # they listen on): both follow a rebind (``_listen_on``; kept on the old addresses,
        # metrics went unserved and a device held any number of connections on the new
        # ones; an independent review, 2026-11-25).
        self._listening: list[Remote] = []
        self._metrics_servers: list[asyncio.Server] = []
        self._metrics_on: list[str] = []
        # Tasks running until stop; each leaves the set as it ends (``_spawn``: a list kept
        # one more for every SIGHUP and rotated key, never pruned).
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False
        self._checking_stops = threading.Event()
        self.started_at = 0.0

    def _hear(self, cluster: ClusterHistory) -> None:
        """What the other servers of the cluster do, told here (the servicer's side is
        ``Elsewhere``): wired as the parts are made, before ``start`` waits for the
        cluster's revocations (set only then, a server whose copy was deleted took them at
        its first poll of that copy, and a revoked token worked for a second; a kill -9
        run, 2026-11-24)."""
        service, hub, people = self.service, self.hub, self.service.ledger.people
        cluster.on_applied = service.ledger.applied  # (what they stored, made visible)
        cluster.on_revoked = service.apply_revocations
        cluster.on_kick = service.kick_here
        cluster.on_removed = service.removed_here
        cluster.on_sender = lambda s: people.add(s.login, s.display_name)  # (mentionable)

        def elsewhere(room: str, kind: int, who: pb.Identity) -> None:
            # (someone also in the room here has neither joined nor left it)
            if all(getattr(m, "login", None) != who.login for m in hub.members(room)):
                service.announce(room, kind, who)

        cluster.on_presence = elsewhere

    @property
    def serving(self) -> Serving:
        """What ``start`` learned and made; RuntimeError before it has."""
        if self._serving is None:
            raise RuntimeError("the server has not started (Server.start)")
        return self._serving

    @property
    def addresses(self) -> list[str]:
        return self.serving.addresses

    @property
    def ports(self) -> list[int]:
        return self.serving.ports

    def _spawn(self, step: Awaitable[Any]) -> None:
        """Run ``step`` until it ends or the server stops."""
        task = asyncio.ensure_future(step)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # start -----------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        status = await wait_running(self.tailnet, cfg.startup_timeout, progress=self.progress)
        self.gate.own_node(status.self_node.node_id)
        self.enrollment.policy = enroll.policy_from(cfg, status.self_node.short_name)
        if isinstance(self.store, ClusterHistory):
            key = await self.store.start(self.gate.policy.key, cfg.startup_timeout)
            if key != self.gate.policy.key:  # the cluster's, so tokens work on every server
                auth.write_key(cfg.key_path, key)
                self._key_stamp = _stamp(cfg.key_path)
            for login, name in self.store.people().items():  # (mentionable, from elsewhere)
                self.service.ledger.people.add(login, name)
            self.gate.apply(policy_for(cfg, key))
            await self.store.follow_key(self._adopt_key)  # a rotation on another server
        addresses = (listen_addresses(status) if cfg.listen == "auto"
                     else parse_listen(cfg.listen))
        try:
            pruned = await self.store.prune(keep_count=cfg.retention_count,
                                            keep_days=cfg.retention_days)
        except StoreError as e:
            # A full disk: reads are still worth serving, and sends are refused as not
            # stored until there is room (the retention loop tries again).
            log.error("retention could not run at start-up (%s); serving anyway", e)
        else:
            if pruned:
                log.info("retention: pruned %d old messages", pruned)
        server, ports = await self._build_grpc(addresses)
        own_files = self.guard.files()  # (before anyone connects: connguard's base)
        await server.start()
        self._serving = Serving(status, addresses, ports, server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if isinstance(self.store, ClusterHistory):  # clients may now fail over to us
            await self.store.register(status.self_node.short_name, ports[0],
                                      status.self_node.node_id)
            self.gate.other_servers(self.store.server_nodes.values())
        self.started_at = time.time()
        # (before _follow_tailnet, whose first word may listen again: started first, it
        # listened on the metrics port while this did, and failed, "the port is in use")
        await self._listen_on(addresses, ports)
        for step in (self.gate.run(), self._follow_tailnet(), self._revocation_loop(),
                     self._retention_loop()):
            self._spawn(step)
        self._check_database()  # (before the helper threads are set to SCHED_BATCH: it is one)
        if cfg.max_connections_per_device:
            self._spawn(self.guard.run(self._listening, own_files))
        if self.owns_process:
            files = raise_file_limit()
            if files < 4096:
                log.warning("this process may open only %d files, and each connection is one: "
                            "raise LimitNOFILE (the units set 65536) or ulimit -n", files)
            if cfg.batch_helper_threads:
                log.debug("%d helper threads set to SCHED_BATCH",
                          yield_helper_threads(keep=self.store.thread_ids()))
            if not batch_grpc_wakeups(asyncio.get_running_loop()):
                log.debug("gRPC's completion reader not found; its wake-ups stay one a turn")
            freeze_startup_heap()
            collector = Collector()
            collector.install()
            self._spawn(self._scale_collector(collector))
        wd = self.notifier.watchdog_interval()
        if wd:
            self._spawn(self._watchdog(wd))
        where = ", ".join(f"{a}:{p}" for a, p in zip(addresses, ports, strict=True))
        name = status.dns_name
        log.info("serving on %s; clients connect with: tsnetchat connect %s%s", where,
                 name.split(".")[0] or "<name>",
                 "" if self.cfg.port == DEFAULT_PORT else f" --port {self.cfg.port}")
        self.progress(f"ready: MagicDNS name {name}, listening on {where}")
        self.notifier.send("READY=1", f"STATUS=serving on {where} as {name}")

    def _check_database(self) -> None:
        """SQLite's quick_check once, on a thread of its own while the server serves: one
        started on a damaged database said "ready" and only warned, at every send, that the
        database failed (an operator's run, 2026-11-24). A damaged one is an error in the
        journal, with the way out, and in the unit's status; reads of what is sound go on.
        (Not ``asyncio.to_thread``: the executor's thread, started by the loop's, would keep
        the normal policy that the helper threads lose.)"""
        loop = asyncio.get_running_loop()

        def check() -> None:
            checked = quick_check(self.cfg.db_path, CHECK_AT_START, self._checking_stops)
            if checked is not None and checked[1] != ["ok"]:
                with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile)
                    loop.call_soon_threadsafe(self._say_damaged, checked[1])

        threading.Thread(target=check, name="tsnetchat-check", daemon=True).start()

    def _say_damaged(self, found: list[str]) -> None:
        log.error("%s", damaged(self.cfg.db_path, "; ".join(found[:3])))
        self.notifier.send("STATUS=the history database is damaged: restore the last backup "
                           "(tsnetchat doctor)")

    async def _build_grpc(self, addresses: list[str]) -> tuple[grpc.aio.Server, list[int]]:
        """A gRPC server (not started) bound to ``addresses``, and its port on each. Raises
        ConfigError naming an address it cannot listen on, having let go of those it bound:
        gRPC keeps them until a server has run, and a move to new addresses that failed on
        one had every later try refused, "the port is in use" (a review, 2026-11-25)."""
        if any(ipaddress.ip_address(a).is_unspecified for a in addresses):  # belt and braces
            raise ConfigError("refusing to listen on an unspecified address")
        streams = ("grpc.max_concurrent_streams", streams_per_connection(self.cfg.limits))
        server = grpc.aio.server(options=[*GRPC_OPTIONS, streams])
        ports = []
        for addr in addresses:
            target = f"[{addr}]:{self.cfg.port}" if ":" in addr else f"{addr}:{self.cfg.port}"
            try:
                port = server.add_insecure_port(target)
            except RuntimeError:  # (gRPC's words say nothing: _why_no_bind)
                port = 0
            if not port:
                why = _why_no_bind(addr, self.cfg.port)
                await server.start()  # (with no handlers yet: it serves nothing)
                await server.stop(None)
                raise ConfigError(f"cannot listen on {target}: {why}")
            ports.append(port)
        server.add_generic_rpc_handlers((self.service.handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self.reflection, server)
        server.add_generic_rpc_handlers((Unknown(self.gate),))  # (last: after every service)
        return server, ports

    # background ----------------------------------------------------------------------

    async def _revocation_loop(self) -> None:
        """Revocations and a new key written by the CLI (another process) take effect here
        within a second, also for streams already open."""
        while True:
            await asyncio.sleep(1.0)
            await self.check_revocations()
            try:
                self.check_key()
            except Exception:  # nothing about the key may end the revocation checks
                log.exception("checking the signing key failed")
            if isinstance(self.store, ClusterHistory):  # (servers come and go: as they do)
                self.gate.other_servers(self.store.server_nodes.values())

    async def check_revocations(self) -> int:
        try:
            new, self._revocation_seq = await self.store.revocations_since(
                self._revocation_seq)
        except Exception as e:  # a locked db must not kill the loop
            log.warning("could not read revocations: %s", e)
            return 0
        if not new:
            return 0
        closed = self.service.apply_revocations(new)
        log.info("revoked %d token(s); closed %d stream(s)", len(new), closed)
        return closed

    def check_key(self) -> bool:
        """Pick up a rotated signing key (`tsnetchat token rotate-key`, or the file deleted):
        every token signed with the old one stops working, open streams included."""
        stamp = _stamp(self.cfg.key_path)
        if stamp == self._key_stamp:
            return False
        try:
            key = auth.load_or_create_key(self.cfg.key_path)
        except ConfigError as e:
            log.error("the signing key changed but cannot be used; keeping the old one: %s", e)
            self._key_stamp = stamp
            return False
        except OSError as e:  # (not ours to read: written by root for a DynamicUser server)
            log.error("the signing key changed but cannot be read (%s: %s); keeping the old "
                      "one: tokens it signs are refused here until the file is the server's "
                      "user's (`tsnetchat token rotate-key` run again does that)",
                      self.cfg.key_path, e.strerror or e)
            self._key_stamp = stamp
            return False
        self._key_stamp = _stamp(self.cfg.key_path)
        if key != self.gate.policy.key:
            self.gate.apply(policy_for(self.cfg, key))
            log.warning("the token signing key was rotated: tokens signed with the old key "
                        "are refused from now on, open streams included")
            if isinstance(self.store, ClusterHistory):  # every server of the cluster too
                self._spawn(self._share_key(self.store, key))
        return True

    async def _share_key(self, cluster: ClusterHistory, key: bytes) -> None:
        """Make a key rotated here the cluster's, retried until the cluster confirms it or
        another rotation replaces it (until then, tokens signed with it work only here)."""
        wait = 0.5
        while key == self.gate.policy.key and not self._stopped:
            try:
                await cluster.share_key(key)
            except StoreError as e:
                log.error("%s; trying again in %gs", e, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 10.0)
                continue
            log.info("cluster: the rotated signing key is now every server's")
            return

    def _adopt_key(self, key: bytes) -> None:
        """The cluster's signing key (``ClusterHistory.follow_key``). A new one was rotated on
        another server: it becomes ours, in the key file too (so `tsnetchat token issue` here
        signs with it), and tokens signed with the old one are refused from now on, open
        streams included (as after a rotation here)."""
        if key == self.gate.policy.key:
            return
        if len(key) < 32:  # never from a tsnetchat server; keep ours rather than a weak one
            log.error("cluster: ignoring a signing key of %d bytes in the cluster's state",
                      len(key))
            return
        try:
            auth.write_key(self.cfg.key_path, key)
        except OSError as e:  # the key in memory is what counts for serving
            log.error("cluster: could not write the cluster's new signing key to %s: %s",
                      self.cfg.key_path, e.strerror)
        self._key_stamp = _stamp(self.cfg.key_path)
        self.gate.apply(policy_for(self.cfg, key))
        log.warning("the token signing key was rotated on another server of the cluster: "
                    "tokens signed with the old key are refused from now on, open streams "
                    "included")

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(300)
            with contextlib.suppress(Exception):
                await self.store.prune(keep_count=self.cfg.retention_count,
                                       keep_days=self.cfg.retention_days)

    async def _scale_collector(self, collector: Collector) -> None:
        while True:
            collector.scale(self.hub.counts()[1])
            await asyncio.sleep(1.0)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _follow_tailnet(self) -> None:
        """Follow tailscaled's IPN bus: every change goes to the gate (identities to ask
        again); when the change may be our own node's, its status is read again
        (``_follow_node``). If the bus is lost, the gate is told (it re-checks every second
        meanwhile) and we keep trying."""
        backoff = 1.0
        lost = False
        while True:
            try:
                async for change in self.tailnet.watch():
                    backoff = 1.0
                    if lost:  # (an operator saw only "lost ..." and could not tell it was
                        lost = False  # back: a daily user's run, 2026-11-24)
                        log.info("following tailscaled's IPN bus again")
                    self.gate.tailnet_changed(change)
                    if change.everything:
                        st = await self.tailnet.status()
                        if st.running:
                            await self._follow_node(st)
                log.warning("tailscaled's IPN bus ended; retrying in %.0fs", backoff)
            except TailnetError as e:
                log.warning("lost tailscaled's IPN bus (%s); retrying in %.0fs", e, backoff)
            except Exception as e:  # e.g. a failed re-listen: follow the bus again anyway
                log.error("following tailscaled's IPN bus failed; retrying in %.0fs", backoff,
                          exc_info=e)
            self.gate.tailnet_lost()
            lost = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30)

    async def _follow_node(self, st: Status) -> None:
        """What tailscaled says of our node now. Registered again (a new node id: deleted in
        the control server, or `tailscale up --force-reauth`), it is ours from now on: the
        gate refuses it as our own, Login and RenewToken name it (``ServerNode``), and the
        cluster lists us under it. (The status read at start stayed: clients stored their
        tokens under a node id that no longer was, and ``tokens.Entry.matches`` compares
        them; a review, 2026-11-25.) With listen = auto, new tailnet addresses are
        listened on (``_maybe_rebind``); metrics that could not listen on them are tried
        again at each such change."""
        before = self.serving.status.self_node
        now = st.self_node
        if now.node_id and now.node_id != before.node_id:
            log.warning("this server's node was registered again: it is %r now (was %r)",
                        now.node_id, before.node_id)
            self._serving = dataclasses.replace(self.serving, status=st)
            self.gate.own_node(now.node_id)
            self.enrollment.policy = dataclasses.replace(self.enrollment.policy,
                                                         server=now.short_name)
            if isinstance(self.store, ClusterHistory):
                await self.store.register(now.short_name, self.serving.ports[0], now.node_id)
        if self.cfg.listen == "auto" and st.ips:
            await self._maybe_rebind(st)
        if self.cfg.metrics_port and self._metrics_on != self.serving.addresses:
            await self._listen_on(self.serving.addresses, self.serving.ports)

    async def _maybe_rebind(self, st: Status) -> None:
        new = listen_addresses(st)
        old = self.serving
        if sorted(new) == sorted(old.addresses):
            return
        log.warning("tailnet addresses changed %s -> %s; re-listening", old.addresses, new)
        server, ports = await self._build_grpc(new)
        await server.start()
        self._serving = Serving(st, new, ports, server)
        try:
            await self._listen_on(new, ports)  # (ConfigError: said by _follow_tailnet)
        finally:
            await old.grpc.stop(self.cfg.shutdown_grace)

    async def _listen_on(self, addresses: list[str], ports: list[int]) -> None:
        """Where gRPC listens, the connection guard sweeps, and metrics (if metrics_port)
        are served: at start and after a move to new addresses. Raises ConfigError naming a
        metrics address it cannot listen on, having let go of those it bound there (and
        ``_follow_node`` tries again: the next move found the addresses unchanged, and
        metrics went unserved until a restart; a review, 2026-11-25)."""
        self._listening[:] = [remote(a, p) for a, p in zip(addresses, ports, strict=True)]
        if not self.cfg.metrics_port:
            return
        for srv in self._metrics_servers:  # (first: an address kept is bound again)
            srv.close()
        self._metrics_servers, self._metrics_on = [], []
        listening = []
        for addr in addresses:
            try:
                listening.append(await asyncio.start_server(self.scrapes.handle, addr,
                                                            self.cfg.metrics_port))
            except OSError as e:  # (it was "unexpected OSError ... a bug": an attacker's run,
                # 2026-11-25, with the port taken)
                for srv in listening:
                    srv.close()
                raise ConfigError(f"cannot serve metrics on {addr}:{self.cfg.metrics_port} "
                                  f"(metrics_port): {_bind_words(e, addr)}") from None
        self._metrics_servers, self._metrics_on = listening, list(addresses)

    # reload / stop -------------------------------------------------------------------

    def reload(self, cfg: ServerConfig) -> None:
        """Apply what can change without a restart (``RELOADABLE``): limits (also for the
        rate buckets of people already connected), retention, require_grant, cap_domain,
        allow_own_node, enroll, and the revocations; everything open is decided again under
        the new settings. Any other key keeps its running value until a restart, and the log
        says which: a new ``state_dir`` taken on a SIGHUP made the server sign with a new
        key there while it went on storing in the old one, so every token was refused (an
        operator's run, 2026-11-23)."""
        later = sorted(f.name for f in settings() if f.name not in RELOADABLE
                       and getattr(cfg, f.name) != getattr(self.cfg, f.name))
        if later:
            log.warning("reload: %s changed in the configuration; kept as running until a "
                        "restart (systemctl restart tsnetchat)", ", ".join(later))
            cfg = dataclasses.replace(cfg, **{k: getattr(self.cfg, k) for k in later})
        streams = streams_per_connection(self.cfg.limits)
        if streams_per_connection(cfg.limits) != streams:  # (a review, 2026-11-25)
            log.warning("reload: max_rooms_per_client is %d now; the calls one connection may "
                        "carry at once stay %d (twice the old value) until a restart",
                        cfg.limits.max_rooms_per_client, streams)
        self.cfg = cfg
        self.service.apply(cfg.limits)
        self.gate.apply(policy_for(cfg, self.gate.policy.key))
        self.enrollment.policy = enroll.policy_from(cfg,
                                                    self.serving.status.self_node.short_name)
        self.check_key()
        self._spawn(self.check_revocations())
        log.info("reloaded configuration; reading revocations")

    async def stop(self, grace: float | None = None) -> None:
        """Drain and close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._checking_stops.set()  # (a long quick_check must not hold up the exit)
        grace = self.cfg.shutdown_grace if grace is None else grace
        self.notifier.send("STOPPING=1", "STATUS=draining")
        try:
            with contextlib.suppress(Exception):
                await self.health.enter_graceful_shutdown()
            n = await self.service.begin_shutdown(drain_timeout=max(grace, self.cfg.store_wait))
            log.info("shutting down: told %d stream(s) to reconnect", n)
            for srv in self._metrics_servers:
                srv.close()
            if self._serving is not None:
                await self._serving.grpc.stop(grace)
            await cancel_all(self._tasks)
        finally:  # (also when stop itself is cancelled: a second signal, a caller's limit)
            await self.store.close()
            self._lock.release()


async def _unless_stopped(stop: asyncio.Event, step: Awaitable[None]) -> bool:
    """Run a start-up step unless a stop signal comes first: then cancel it and return False.
    (Waiting for tailscaled, `serve` ignored SIGTERM for its whole startup_timeout.)"""
    task = asyncio.ensure_future(step)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        task.result()
        return True
    await cancel_all([task])
    if not task.cancelled() and task.exception() is not None:
        log.warning("start-up failed as it was stopped: %s", task.exception())
    log.info("stopped before start-up was done")
    return False


async def serve(cfg: ServerConfig, *, reload_config: Callable[[], ServerConfig] | None = None,
                before_start: Callable[[], Awaitable[None]] | None = None,
                after_stop: Callable[[], Awaitable[None]] | None = None) -> int:
    """Run until SIGTERM/SIGINT. A second SIGINT/SIGTERM exits at once. SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hup = asyncio.Event()
    signals_seen = 0

    def on_stop() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now")
            raise SystemExit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, hup.set)

    api = LocalAPI(cfg.effective_socket(), timeout=cfg.whois_timeout)
    server: Server | None = None
    try:
        if before_start is not None and not await _unless_stopped(stop, before_start()):
            return 0
        server = Server(cfg, tailnet=api, owns_process=True)
        if not await _unless_stopped(stop, server.start()):
            return 0
        while not stop.is_set():
            hup.clear()
            stop_wait = asyncio.create_task(stop.wait())
            hup_wait = asyncio.create_task(hup.wait())
            await asyncio.wait({stop_wait, hup_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            hup_wait.cancel()
            if hup.is_set() and not stop.is_set():
                try:
                    server.reload(reload_config() if reload_config else server.cfg)
                except ConfigError as e:
                    log.error("reload refused, keeping the old config: %s", e)
    finally:
        if server is not None:
            await server.stop()
        await api.aclose()
        if after_stop is not None:
            await after_stop()
    return 0


def _why_no_bind(addr: str, port: int) -> str:
    """Why gRPC could not listen on ``addr``:``port``, in words, from a bind of our own:
    gRPC says only "Failed to bind ...; set GRPC_VERBOSITY=debug ...", and an address not
    on this machine was put as "is another server running on that port?" (a newcomer,
    2026-11-24)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as gRPC binds)
            s.bind((addr, port))
    except OSError as e:
        return _bind_words(e, addr)
    return "gRPC could not bind it, though it is free now (try again)"


def _bind_words(e: OSError, addr: str) -> str:
    """Why a bind to ``addr`` failed, in words."""
    if e.errno == errno.EADDRINUSE:
        return "the port is in use (is another server running on it?)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{addr} is not an address of this machine"
    if e.errno == errno.EACCES:
        return "permission denied (a port under 1024 needs root)"
    return e.strerror or str(e)
