#!/usr/bin/env python3
"""The NATS JetStream figures in docs/nats-cluster.md, measured on a fresh three-node cluster.

    .venv/bin/python bench/nats_primitives.py            # latency, throughput, failover
    .venv/bin/python bench/nats_primitives.py --no-failover

One Python process (nats-py) publishes and consumes; the three nats-server processes share
the machine with it, unpinned. On a 2-core machine shared with other work the figures are
noisy: run it twice and compare. Prints one line per figure and writes JSON to stdout's last
line with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import nats
import nats.errors
import nats.js.errors
import nats_lab
from nats.js.api import StreamConfig

PAYLOAD = b"x" * 120  # about a chat message with its sender fields


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


async def _quiet(_e: Exception) -> None:
    pass


async def connect(c: nats_lab.NatsCluster) -> Any:
    return await nats.connect(servers=c.urls, user=c.user, password=c.password,
                              error_cb=_quiet, max_reconnect_attempts=-1,
                              reconnect_time_wait=0.1)


async def atomic_batch(nc: Any, subject: str, n: int, expected_last: int) -> int:
    bid = uuid.uuid4().hex[:22]
    for i in range(1, n):
        h = {"Nats-Batch-Id": bid, "Nats-Batch-Sequence": str(i)}
        if i == 1:
            h["Nats-Expected-Last-Subject-Sequence"] = str(expected_last)
        await nc.publish(subject, PAYLOAD, headers=h)
    h = {"Nats-Batch-Id": bid, "Nats-Batch-Sequence": str(n), "Nats-Batch-Commit": "1"}
    if n == 1:
        h["Nats-Expected-Last-Subject-Sequence"] = str(expected_last)
    reply = json.loads((await nc.request(subject, PAYLOAD, timeout=5, headers=h)).data)
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return int(reply["seq"])


async def throughput(c: nats_lab.NatsCluster, replicas: int, out: dict[str, Any]) -> None:
    nc = await connect(c)
    js = nc.jetstream()
    name = f"R{replicas}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"],
                                     num_replicas=replicas, allow_atomic=True))
    pre = f"{name.lower()}.room"
    last, lat = 0, []
    started = time.monotonic()
    for _ in range(1000):
        t = time.monotonic()
        ack = await js.publish(f"{pre}.one", PAYLOAD, headers={
            "Nats-Expected-Last-Subject-Sequence": str(last)})
        last = ack.seq
        lat.append(time.monotonic() - t)
    rate = 1000 / (time.monotonic() - started)
    out[f"{name} one room, 1 message per append"] = {
        "msg_per_s": round(rate), "ack_p50_ms": round(pct(lat, .5) * 1e3, 2),
        "ack_p99_ms": round(pct(lat, .99) * 1e3, 2)}
    for size in (16, 64, 256):
        last, lat, total = 0, [], 0
        started = time.monotonic()
        while time.monotonic() - started < 3:
            t = time.monotonic()
            last = await atomic_batch(nc, f"{pre}.b{size}", size, last)
            total += size
            lat.append(time.monotonic() - t)
        out[f"{name} one room, atomic batches of {size}"] = {
            "msg_per_s": round(total / (time.monotonic() - started)),
            "commit_p50_ms": round(pct(lat, .5) * 1e3, 2),
            "commit_p99_ms": round(pct(lat, .99) * 1e3, 2)}
    stop = asyncio.Event()

    async def room(r: int) -> int:
        last_r, n = 0, 0
        while not stop.is_set():
            last_r = await atomic_batch(nc, f"{pre}.p{r}", 16, last_r)
            n += 16
        return n

    tasks = [asyncio.create_task(room(r)) for r in range(16)]
    started = time.monotonic()
    await asyncio.sleep(3)
    stop.set()
    total = sum(await asyncio.gather(*tasks))
    out[f"{name} 16 rooms at once, atomic batches of 16"] = {
        "msg_per_s": round(total / (time.monotonic() - started))}
    await nc.close()


async def cross_latency(c: nats_lab.NatsCluster, out: dict[str, Any]) -> None:
    """Publish on one connection, receive on another through an ordered consumer: what a
    message from server A to server B costs in NATS."""
    pub, sub = await connect(c), await connect(c)
    js = pub.jetstream()
    await js.add_stream(StreamConfig(name="X", subjects=["x.>"], num_replicas=3))
    lat: list[float] = []

    async def on_msg(msg: Any) -> None:
        lat.append(time.monotonic() - struct.unpack("d", msg.data[:8])[0])

    s = await sub.jetstream().subscribe("x.>", cb=on_msg, ordered_consumer=True,
                                        idle_heartbeat=1.0)
    for _ in range(500):
        await js.publish("x.room", struct.pack("d", time.monotonic()) + PAYLOAD)
        await asyncio.sleep(0.004)
    await asyncio.sleep(0.5)
    out["R3 publish -> ordered consumer on another connection (500 at 250/s)"] = {
        "p50_ms": round(pct(lat, .5) * 1e3, 2), "p99_ms": round(pct(lat, .99) * 1e3, 2),
        "received": len(lat)}
    await s.unsubscribe()
    await pub.close()
    await sub.close()


async def failover(c: nats_lab.NatsCluster, which: str, out: dict[str, Any]) -> None:
    """Publish continuously (0.25 s attempts, retried with the same Nats-Msg-Id) and SIGKILL
    one node; report the longest time between two acks."""
    nc = await connect(c)
    js = nc.jetstream()
    tag = which.split()[0].strip("'s")
    stream = f"F{tag.upper()}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"f{tag}.>"], num_replicas=3))
    stop = asyncio.Event()
    gaps: list[float] = []

    async def pump() -> None:
        i, last_ok = 0, time.monotonic()
        while not stop.is_set():
            i += 1
            while not stop.is_set():
                try:
                    await js.publish(f"f{tag}.room", PAYLOAD, timeout=0.25,
                                     headers={"Nats-Msg-Id": f"{tag}{i}"})
                    break
                except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
                    await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last_ok)
            last_ok = now
            await asyncio.sleep(0.01)

    task = asyncio.create_task(pump())
    await asyncio.sleep(1)
    leader = c.stream_leader(stream)
    here = c.node_of(nc.connected_url.port)
    victim = {"leader": leader, "client's node": here,
              "follower": next(n.name for n in c.nodes if n.name not in (leader, here))
              if here != leader else next(n.name for n in c.nodes if n.name != leader)}[which]
    c.kill(victim)
    await asyncio.sleep(12)
    stop.set()
    await task
    c.start_node(victim)
    out[f"SIGKILL the {which} ({victim}; leader {leader}, client on {here})"] = {
        "longest_gap_between_acks_s": round(max(gaps), 2)}
    await nc.close()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    with nats_lab.running_cluster() as c:
        await throughput(c, 3, out)
        await throughput(c, 1, out)
        await cross_latency(c, out)
        if not args.no_failover:
            for which in ("follower", "leader", "client's node"):
                await failover(c, which, out)
    for k, v in out.items():
        print(f"{k:70} {v}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
