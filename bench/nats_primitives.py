#!/usr/bin/env python3
"""The NATS JetStream figures in docs/nats-cluster.md, measured on a fresh three-node cluster.

    .venv/bin/python bench/nats_primitives.py            # latency, throughput, failover
    .venv/bin/python bench/nats_primitives.py --no-failover
    .venv/bin/python bench/nats_primitives.py --only-streams 300   # cost of a stream per room
    .venv/bin/python bench/nats_primitives.py --only-erasure       # deleted bytes off the disks
    .venv/bin/python bench/nats_primitives.py --only-no-quorum     # what unacked sends become

One Python process (nats-py) publishes and consumes; the three nats-server processes share
the machine with it, unpinned. On a 2-core machine shared with other work the figures are
noisy: run it twice and compare. Prints one line per figure and writes JSON to stdout's last
line with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
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
from nats.js.api import KeyValueConfig, StreamConfig

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


async def kv_put(c: nats_lab.NatsCluster, out: dict[str, Any]) -> None:
    nc = await connect(c)
    kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="reads", replicas=3))
    lat = []
    for i in range(300):
        t = time.monotonic()
        await kv.put("alice.general", b"%d" % i)
        lat.append(time.monotonic() - t)
    out["R3 KV put, one at a time"] = {"p50_ms": round(pct(lat, .5) * 1e3, 2),
                                       "p99_ms": round(pct(lat, .99) * 1e3, 2)}
    await nc.close()


async def failover(c: nats_lab.NatsCluster, which: str, out: dict[str, Any]) -> None:
    """Publish continuously (0.25 s attempts, retried with the same Nats-Msg-Id) and SIGKILL
    one node; report the longest time between two acks."""
    nc = await connect(c)
    js = nc.jetstream()
    tag = which.split()[0].strip("'s")
    stream = f"F{tag.upper()}"
    # Just after a node restarts, R3 placement may still count it offline (10005).
    started = time.monotonic()
    while True:
        try:
            await js.add_stream(StreamConfig(name=stream, subjects=[f"f{tag}.>"],
                                             num_replicas=3))
            break
        except nats.js.errors.APIError as e:
            if e.err_code != 10005 or time.monotonic() - started > 60:
                raise
            await asyncio.sleep(0.2)
    waited = time.monotonic() - started
    if waited > 0.5:
        out[f"before the {which} scenario: 'no suitable peers for placement' for (s)"] = round(
            waited, 1)
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


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


async def _idle(c: nats_lab.NatsCluster, seconds: float = 10) -> tuple[float, float]:
    """(percent of one core, MB resident) of the whole cluster while nothing happens."""
    pids = [n.pid for n in c.nodes]
    before = _cpu_seconds(pids)
    await asyncio.sleep(seconds)
    cpu = (_cpu_seconds(pids) - before) / seconds * 100
    rss = sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) for p in pids)
    return round(cpu, 1), round(rss * os.sysconf("SC_PAGE_SIZE") / 2**20)


async def streams_cost(c: nats_lab.NatsCluster, n: int, out: dict[str, Any]) -> None:
    """What a stream per room would cost: creation time and the idle cluster's CPU and RSS."""
    nc = await connect(c)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="ONE", subjects=["one.>"], num_replicas=3))
    await asyncio.sleep(2)
    out["1 R3 stream: idle cluster (% of a core, MB RSS)"] = await _idle(c)
    started = time.monotonic()
    for i in range(n):
        await js.add_stream(StreamConfig(name=f"S{i}", subjects=[f"s{i}.>"], num_replicas=3))
    out[f"create {n} more R3 streams (ms each)"] = round(
        (time.monotonic() - started) / n * 1e3)
    await asyncio.sleep(5)
    out[f"{n + 1} R3 streams: idle cluster (% of a core, MB RSS)"] = await _idle(c)
    await nc.close()


async def erasure(c: nats_lab.NatsCluster, out: dict[str, Any]) -> None:
    """How long a securely deleted message's bytes stay in any file of the cluster (the
    stream's Raft log keeps them until it is compacted), with a message every 5 s."""
    nc = await connect(c)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="E", subjects=["e.>"], num_replicas=3))
    secret = b"SECRET-" + uuid.uuid4().hex.encode()

    def files_holding() -> list[str]:
        found = subprocess.run(["grep", "-rlaF", secret.decode(), str(c.root)],
                               capture_output=True, text=True).stdout.split()
        return [f for f in found if "/logs/" not in f]

    ack = await js.publish("e.room", secret)
    await asyncio.sleep(0.5)
    out["files holding the message before the delete"] = len(files_holding())
    await js.delete_msg("E", ack.seq)
    started = time.monotonic()
    await asyncio.sleep(0.5)
    out["files holding it 0.5 s after a secure delete"] = len(files_holding())
    while files_holding() and time.monotonic() - started < 400:
        await js.publish("e.room", b"later traffic")
        await asyncio.sleep(5)
    out["seconds until no file of any node holds it"] = round(time.monotonic() - started)
    await nc.close()


async def no_quorum(c: nats_lab.NatsCluster, out: dict[str, Any]) -> None:
    """Stop (SIGTERM) two of three nodes, publish 10 messages with 1 s timeouts, start the
    two again: how many of the unacknowledged messages were stored after all?"""
    nc = await connect(c)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="Q", subjects=["q.>"], num_replicas=3))
    await js.publish("q.room", b"before")
    here = c.node_of(nc.connected_url.port)
    others = [n.name for n in c.nodes if n.name != here]
    leader = c.stream_leader("Q")
    for name in others:
        c.stop_node(name)
    outcomes: dict[str, int] = {}
    for i in range(10):
        try:
            await js.publish("q.room", b"unacked %d" % i, timeout=1)
            outcomes["acked"] = outcomes.get("acked", 0) + 1
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
    left = "led" if leader == here else "did not lead"
    out[f"10 publishes without a quorum (the node left {left} the stream)"] = outcomes
    started = time.monotonic()
    for name in others:
        c.start_node(name, wait=False)
    pending = 0
    while True:
        try:
            await js.publish("q.room", b"after", timeout=1, headers={"Nats-Msg-Id": "after"})
            break
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
            await asyncio.sleep(0.1)
        except nats.js.errors.APIError as e:
            if e.err_code != 10158:  # "duplicate message id is in process": still proposed
                raise
            pending += 1
            await asyncio.sleep(0.1)
    out["retries answered 'duplicate message id is in process' (10158)"] = pending
    out["seconds from starting them to the next ack"] = round(time.monotonic() - started, 1)
    info = await js.stream_info("Q")
    out["of the 10 unacknowledged, stored after all"] = info.state.messages - 2
    await nc.close()


async def _all(c: nats_lab.NatsCluster, out: dict[str, Any], *, failover_too: bool) -> None:
    await throughput(c, 3, out)
    await throughput(c, 1, out)
    await cross_latency(c, out)
    await kv_put(c, out)
    if failover_too:
        for which in ("follower", "leader", "client's node"):
            await failover(c, which, out)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--only-streams", type=int, metavar="N", default=0)
    ap.add_argument("--only-erasure", action="store_true")
    ap.add_argument("--only-no-quorum", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    with nats_lab.running_cluster() as c:
        if args.only_streams:
            await streams_cost(c, args.only_streams, out)
        elif args.only_erasure:
            await erasure(c, out)
        elif args.only_no_quorum:
            await no_quorum(c, out)
        else:
            await _all(c, out, failover_too=not args.no_failover)
    for k, v in out.items():
        print(f"{k:70} {v}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
