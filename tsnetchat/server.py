"""The daemon's lifecycle: start -> serve -> stop(grace).

``Server.start`` asks tailscaled (LocalAPI) whether it is up, picks the listen addresses
(tailnet IPs with a TUN device; loopback in userspace mode, where tailscaled delivers
tailnet traffic), opens the store and the key, and only then binds and reports READY.
``Server.stop`` stops accepting, tells streams the server is going away, waits up to the
grace period, and closes the store. Signals only set events (see ``run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import auth
from .config import ServerConfig, parse_listen
from .errors import ConfigError, LocalAPIUnavailable, TailnetError
from .gate import Gate, WhoIsFunc
from .hub import Hub, Pacing
from .loop import Collector, LoopLoad, freeze_startup_heap, yield_helper_threads
from .metrics import Metrics
from .notify import Notifier
from .pb import chat_pb2 as pb
from .service import SERVICE_NAME, ChatService, Limits
from .store import MAX_GROUP, SqliteHistory
from .tailnet import LocalAPI, Status, wait_running

log = logging.getLogger("tsnetchat.server")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.max_concurrent_streams", 256),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
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


def listen_addresses(status: Status) -> list[str]:
    """Where tailnet traffic arrives: the node's tailnet IPs on a TUN device; in userspace
    mode tailscaled re-dials every inbound tailnet connection (v4 and v6) to 127.0.0.1."""
    if status.tun:
        ips = [ip for ip in status.ips if not ipaddress.ip_address(ip).is_unspecified]
        if not ips:
            raise TailnetError("tailscaled reports a TUN device but no tailnet addresses")
        return ips
    return ["127.0.0.1"]


def limits_from(cfg: ServerConfig) -> Limits:
    return Limits(max_message_bytes=cfg.max_message_bytes, history_on_join=cfg.history_on_join,
                  max_page=cfg.max_page, rate_burst=cfg.rate_burst,
                  rate_per_second=cfg.rate_per_second,
                  max_rooms_per_client=cfg.max_rooms_per_client,
                  subscriber_queue=cfg.subscriber_queue, call_burst=cfg.call_burst,
                  call_rate=cfg.call_rate)


class Server:
    def __init__(self, cfg: ServerConfig, *, whois: WhoIsFunc | None = None,
                 notifier: Notifier | None = None,
                 progress: Callable[[str], None] | None = None,
                 pacing: Pacing | None = None, owns_process: bool = False) -> None:
        self.cfg = cfg
        self.pacing = pacing  # the hub's latency/throughput trade; tests force its branches
        # The daemon's server may tune the whole process (thread scheduling, the collector)
        # once started; tests run several servers in one process and leave it alone.
        self.owns_process = owns_process
        self._whois_override = whois  # tests of pure chat logic may stand in for tailscaled
        self.notifier = notifier or Notifier()
        self.progress = progress or (lambda m: log.info("%s", m))
        self.metrics = Metrics()
        self.addresses: list[str] = []
        self.ports: list[int] = []
        self.status: Status | None = None
        self.api: LocalAPI | None = None
        self.store: SqliteHistory | None = None
        self.service: ChatService | None = None
        self.health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._revocation_seq = 0
        self.started_at = 0.0

    # start -----------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        key = auth.load_or_create_key(cfg.key_path)  # refuses an open key file
        self.api = LocalAPI(cfg.effective_socket(), timeout=cfg.whois_timeout)
        if cfg.listen == "auto":
            self.status = await wait_running(self.api, cfg.startup_timeout,
                                             progress=self.progress)
            self.addresses = listen_addresses(self.status)
        else:
            self.addresses = parse_listen(cfg.listen)
            if self._whois_override is None:
                self.status = await wait_running(self.api, cfg.startup_timeout,
                                                 progress=self.progress)
        self.store = await SqliteHistory.open(
            cfg.db_path, fsync=cfg.fsync, wait=cfg.store_wait,
            max_group=max(1, min(MAX_GROUP, cfg.subscriber_queue // 4)))
        pruned = await self.store.prune(keep_count=cfg.retention_count,
                                        keep_days=cfg.retention_days)
        if pruned:
            log.info("retention: pruned %d old messages", pruned)
        revoked, self._revocation_seq = await self.store.revocations_since(0)
        whois: WhoIsFunc = self._whois_override or self.api.whois
        gate = Gate(whois=whois, key=key, cap_name=cfg.cap_name, require_grant=cfg.require_grant,
                    whois_timeout=cfg.whois_timeout, revoked=revoked)
        load = LoopLoad(asyncio.get_running_loop())
        hub = Hub(self.pacing, load=load)
        self.store.linger = lambda: hub.pacing.commit_linger(load())
        self.service = ChatService(store=self.store, hub=hub, gate=gate,
                                   limits=limits_from(cfg), metrics=self.metrics)
        self.metrics.gauge("subscribers", lambda: float(self.service.hub.counts()[1])
                           if self.service else 0.0)
        self.metrics.gauge("whois_lookups_total", lambda: float(gate.whois_calls))
        self.metrics.gauge("loop_busy", lambda: load.value)
        self._grpc = self._build_grpc(self.addresses)
        await self._grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self.started_at = time.time()
        self._tasks = [asyncio.create_task(self._revocation_loop()),
                       asyncio.create_task(self._retention_loop())]
        if self._whois_override is None and cfg.listen == "auto":
            self._tasks.append(asyncio.create_task(self._watch_addresses()))
        if cfg.metrics_port:
            await self._start_metrics()
        if self.owns_process:
            if cfg.batch_helper_threads:
                log.debug("%d helper threads set to SCHED_BATCH",
                          yield_helper_threads(keep=self.store.thread_ids()))
            freeze_startup_heap()
            collector = Collector()
            collector.install()
            self._tasks.append(asyncio.create_task(self._scale_collector(collector)))
        wd = self.notifier.watchdog_interval()
        if wd:
            self._tasks.append(asyncio.create_task(self._watchdog(wd)))
        where = ", ".join(f"{a}:{p}" for a, p in zip(self.addresses, self.ports, strict=True))
        name = self.status.dns_name if self.status else "(no tailnet status)"
        log.info("serving on %s; clients connect with: tsnetchat connect %s", where,
                 name.split(".")[0] if self.status else "<name>")
        if self.status:
            self.progress(f"ready: MagicDNS name {name}, listening on {where}")
        self.notifier.send("READY=1", f"STATUS=serving on {where} as {name}")

    def _build_grpc(self, addresses: list[str]) -> grpc.aio.Server:
        assert self.service is not None
        server = grpc.aio.server(options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers((self.service.handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["Chat"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME), server)
        self.ports = []
        for addr in addresses:
            if ipaddress.ip_address(addr).is_unspecified:  # belt and braces
                raise ConfigError("refusing to listen on an unspecified address")
            target = f"[{addr}]:{self.cfg.port}" if ":" in addr else f"{addr}:{self.cfg.port}"
            try:
                port = server.add_insecure_port(target)
            except RuntimeError as e:
                raise ConfigError(f"cannot listen on {target}: {e} (is another server "
                                  "running on that port?)") from e
            if not port:
                raise ConfigError(f"cannot listen on {target} (port in use?)")
            self.ports.append(port)
        return server

    # background ----------------------------------------------------------------------

    async def _revocation_loop(self) -> None:
        """Revocations written by `tsnetchat token revoke` (another process) take effect here
        within a second, also for streams already open."""
        while True:
            await asyncio.sleep(1.0)
            await self.check_revocations()

    async def check_revocations(self) -> int:
        assert self.store is not None and self.service is not None
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

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(300)
            assert self.store is not None
            with contextlib.suppress(Exception):
                await self.store.prune(keep_count=self.cfg.retention_count,
                                       keep_days=self.cfg.retention_days)

    async def _scale_collector(self, collector: Collector) -> None:
        while True:
            if self.service is not None:
                collector.scale(self.service.hub.counts()[1])
            await asyncio.sleep(1.0)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _watch_addresses(self) -> None:
        """Follow tailscaled's IPN bus; when our tailnet addresses change (TUN mode), listen
        on the new ones. If tailscaled goes away, keep serving and keep trying."""
        assert self.api is not None
        backoff = 1.0
        while True:
            try:
                async for _note in self.api.watch():
                    backoff = 1.0
                    st = await self.api.status()
                    if st.running and st.ips:
                        await self._maybe_rebind(st)
            except (LocalAPIUnavailable, TailnetError) as e:
                log.warning("lost tailscaled's IPN bus (%s); retrying in %.0fs", e, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30)

    async def _maybe_rebind(self, st: Status) -> None:
        new = listen_addresses(st)
        if sorted(new) == sorted(self.addresses):
            return
        log.warning("tailnet addresses changed %s -> %s; re-listening", self.addresses, new)
        old = self._grpc
        self._grpc = self._build_grpc(new)
        await self._grpc.start()
        self.addresses, self.status = new, st
        if old is not None:
            await old.stop(self.cfg.shutdown_grace)

    async def _start_metrics(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                body = self.metrics.render_prometheus().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                             b"Content-Length: " + str(len(body)).encode() +
                             b"\r\nConnection: close\r\n\r\n" + body)
                await writer.drain()
            writer.close()

        for addr in self.addresses:
            srv = await asyncio.start_server(handle, addr, self.cfg.metrics_port)
            self._tasks.append(asyncio.create_task(srv.serve_forever()))

    # reload / stop -------------------------------------------------------------------

    def reload(self, cfg: ServerConfig) -> None:
        """Apply what can change without a restart: limits, grants policy, revocations."""
        assert self.service is not None
        self.cfg = cfg
        self.service.limits = limits_from(cfg)
        self.service.gate.require_grant = cfg.require_grant
        self.service.gate.cap_name = cfg.cap_name
        self._tasks.append(asyncio.ensure_future(self.check_revocations()))
        log.info("reloaded configuration; reading revocations")

    async def stop(self, grace: float | None = None) -> None:
        grace = self.cfg.shutdown_grace if grace is None else grace
        self.notifier.send("STOPPING=1", "STATUS=draining")
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        if self.service is not None:
            n = await self.service.begin_shutdown(drain_timeout=max(grace, self.cfg.store_wait))
            log.info("shutting down: told %d stream(s) to reconnect", n)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.api is not None:
            await self.api.aclose()

    async def wait_closed(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


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

    server = Server(cfg, owns_process=True)
    try:
        if before_start is not None:
            await before_start()
        await server.start()
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
        await server.stop()
        if after_stop is not None:
            await after_stop()
    return 0

