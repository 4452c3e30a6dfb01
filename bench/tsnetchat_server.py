#!/usr/bin/env python3
"""tsnetchat's real server for benchmarks on loopback.

The token lock runs as in production. The tailnet lock uses a stand-in WhoIs (every peer is
bench@tailnet.test) because loopback load has no tailscaled in front; the cost of the real
WhoIs and of the userspace tailnet is measured separately (scenario "connect cost").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tsnetchat import auth
from tsnetchat.config import load_config
from tsnetchat.loop import new_event_loop
from tsnetchat.server import Server
from tsnetchat.tailnet import Change, PeerInfo, Status, WhoIs

BENCH = WhoIs(login="bench@tailnet.test", display_name="Bench", node_name="bench",
              node_id="b", tags=(), addresses=())


class BenchTailnet:
    """Every peer is bench@tailnet.test; nothing ever changes."""

    async def status(self) -> Status:
        me = PeerInfo(host_name="bench-server", dns_name="bench-server.", ips=("127.0.0.1",),
                      online=True, last_seen="", login="chat@bench", node_id="server")
        return Status(backend_state="Running", tun=False, self_node=me, peers=(),
                      magic_dns_suffix="", magic_dns_enabled=False)

    async def whois(self, addr: str) -> WhoIs:
        return BENCH

    async def watch(self) -> AsyncIterator[Change]:
        yield Change(everything=True)
        await asyncio.Event().wait()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--metrics-port", type=int, default=0)
    ap.add_argument("--state-dir", help="history and key (default: a new temporary dir)")
    ap.add_argument("--cluster", default="", help="cluster mode: the NATS URLs")
    ap.add_argument("--nats-user", default="")
    ap.add_argument("--nats-password", default="")
    args = ap.parse_args()
    state = args.state_dir or tempfile.mkdtemp(prefix="tsnetchat-bench-")
    cluster = ({"cluster": args.cluster, "nats_user": args.nats_user,
                "nats_password": args.nats_password} if args.cluster else {})
    cfg = load_config(env={}, flags={**cluster,
        "state_dir": state, "listen": "127.0.0.1", "port": args.port, "rate_burst": 10**9,
        "rate_per_second": 1e9, "call_burst": 10**9, "call_rate": 1e9,
        "max_rooms_per_client": 10**6, "subscriber_queue": 8192, "history_on_join": 0,
        "retention_count": 0, "metrics_port": args.metrics_port or None,
        # every subscriber is one device here: the guard sweeps (its cost is measured) and
        # never closes one
        "max_connections_per_device": 10**6})
    server = Server(cfg, tailnet=BenchTailnet(), owns_process=True)  # as `tsnetchat serve`
    await server.start()
    tok, _ = auth.issue_token(cfg.key_path.read_bytes().strip(), BENCH.login, ["*"],
                              ttl_seconds=86400)
    Path(args.token_file).write_text(tok)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    # The same loop as `tsnetchat serve`, so the hub sees the loop's load (tsnetchat.loop).
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())
