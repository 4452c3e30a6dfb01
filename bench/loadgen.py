#!/usr/bin/env python3
"""Load generator worker processes (driven by bench/run.py).

    loadgen.py subscribe --target H:P --token T --room R --n N --conns C [--stall K]
        opens N Subscribe streams over C connections; prints {"ready": n} once replay_done
        arrived on every stream (or after --ready-timeout), then counts deliveries until a
        line arrives on stdin, then prints a JSON result and exits.
    loadgen.py send --target H:P --token T --room R --count N --rate R [--window W]
                     [--start-after S]
        one Join stream; sends N messages at R/s (0 = as fast as acks allow, W in flight),
        the first S seconds after the hello; each text starts with the send time in ns.
        Prints a JSON result.

Latency = receive time - send time, on the same machine clock. To keep memory flat, only
the first --sample streams of a worker record latencies; all streams count deliveries.
Stalled streams (--stall K) never read after replay_done: a client that stopped reading.
With --spread, the result also has ``last_arrival_ms``: per message, in the order sent, how
long until the last stream had it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tsnetchat.client import acks_in
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.pb import chat_pb2_grpc as pb_grpc

OPTS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def subscribe(a: argparse.Namespace) -> None:
    channels = [grpc.aio.insecure_channel(a.target, options=OPTS) for _ in range(a.conns)]
    md = (("authorization", f"Bearer {a.token}"),)
    ready = 0
    all_ready = asyncio.Event()
    counts = [0] * a.n
    lat: list[float] = []
    first_ns = [0]
    last_ns = [0]
    errors: dict[str, int] = {}
    last_of: dict[int, int] = {}  # --spread: send time -> the latest arrival over all streams

    async def one(i: int) -> None:
        nonlocal ready
        stub = pb_grpc.ChatStub(channels[i % a.conns])
        call = stub.Subscribe(pb.SubscribeRequest(room=a.room), metadata=md)
        sample = i < a.sample
        try:
            async for ev in call:
                which = ev.WhichOneof("event")
                if which == "replay_done":
                    ready += 1
                    if ready == a.n - a.stall:
                        all_ready.set()
                    if i < a.stall:
                        await asyncio.Event().wait()  # a client that stopped reading
                    continue
                msgs = ([ev.message] if which == "message" else
                        ev.batch.messages if which == "batch" else ())
                if not msgs:
                    continue
                now = time.time_ns()
                if not first_ns[0]:
                    first_ns[0] = now
                last_ns[0] = now
                counts[i] += len(msgs)
                if sample or a.spread:
                    for m in msgs:
                        sent = int(m.text.split("|", 1)[0])
                        if sample:
                            lat.append((now - sent) / 1e6)
                        if a.spread and now > last_of.get(sent, 0):
                            last_of[sent] = now
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] = errors.get(e.code().name, 0) + 1
        except asyncio.CancelledError:
            pass

    cpu0 = cpu()
    tasks = [asyncio.create_task(one(i)) for i in range(a.n)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_ready.wait(), a.ready_timeout)
    print(json.dumps({"ready": ready}), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if len(words := line.split()) == 2:  # "stop N": as in loadgen-go's awaitCounts
        want, last, since = int(words[1]), -1, time.monotonic()
        while min(counts[a.stall:] or [want]) < want:
            if sum(counts) != last:
                last, since = sum(counts), time.monotonic()
            elif time.monotonic() - since > 2:
                break
            await asyncio.sleep(0.01)
    for t in tasks:
        t.cancel()
    out = {"deliveries": sum(counts), "per_stream_min": min(counts[a.stall:] or [0]),
           "latencies_ms": lat, "first_ns": first_ns[0], "last_ns": last_ns[0],
           "cpu_s": cpu() - cpu0, "errors": errors, "ready": ready}
    if a.spread:
        out["last_arrival_ms"] = [(last_of[t] - t) / 1e6 for t in sorted(last_of)]
    print(json.dumps(out), flush=True)
    os._exit(0)  # skip slow teardown of thousands of streams


async def send(a: argparse.Namespace) -> None:
    channel = grpc.aio.insecure_channel(a.target, options=OPTS)
    stub = pb_grpc.ChatStub(channel)
    md = (("authorization", f"Bearer {a.token}"),)
    acked = 0
    window = asyncio.Semaphore(a.window)
    done = asyncio.Event()
    pad = "x" * max(0, a.size - 20)
    start_ns = time.time_ns()

    async def requests() -> Any:
        yield pb.ClientEvent(hello=pb.Hello(room=a.room, after_id=2**62, batch_acks=True))
        await asyncio.sleep(a.start_after)  # the join's presence event goes out first
        t0 = time.monotonic()
        for i in range(a.count):
            if a.rate:
                delay = t0 + i / a.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await window.acquire()
            yield pb.ClientEvent(send=pb.SendMessage(text=f"{time.time_ns()}|{pad}",
                                                     client_msg_id=str(i)))
        await done.wait()

    cpu0 = cpu()
    call = stub.Join(requests(), metadata=md)
    async for ev in call:
        n = len(acks_in(ev))
        for _ in range(n):
            acked += 1
            window.release()
        if n and acked >= a.count:
            break
    end_ns = time.time_ns()
    done.set()
    call.cancel()
    print(json.dumps({"sent": acked, "start_ns": start_ns, "end_ns": end_ns,
                      "cpu_s": cpu() - cpu0}), flush=True)
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["subscribe", "send"])
    ap.add_argument("--target", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--room", default="bench")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--stall", type=int, default=0)
    ap.add_argument("--sample", type=int, default=10)
    ap.add_argument("--spread", action="store_true")
    ap.add_argument("--ready-timeout", type=float, default=120)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--start-after", type=float, default=0.0)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    asyncio.run(subscribe(a) if a.mode == "subscribe" else send(a))


if __name__ == "__main__":
    main()
