#!/usr/bin/env python3
"""What a flood of refused calls from one device costs everyone else, over the real lab.

    scripts/dev-tailnet up --dir /tmp/flood-lab
    .venv/bin/python bench/refusal_flood.py --lab /tmp/flood-lab [--seconds 15] [--conns 64]
        [--window 8] [--elsewhere] [--profile FILE.prof] [--perf FILE.data] [--json FILE]
        [--tree WORKTREE] [--env NAME=VALUE]

Starts ``tsnetchat serve`` on the lab's chat-server node, then, in one run:

1. quiet: alice (alice-laptop, a valid token, one connection through her tailscaled) calls
   WhoAmI 20 times a second for ``--seconds``;
2. flood: the same, while mallory (mallory-laptop) calls WhoAmI with a junk token as fast as
   it goes on ``--conns`` connections through her tailscaled, each connection keeping
   ``--window`` calls in flight and opened again when the server closes it.

Prints, per phase, alice's latency (p50, p99, max; errors), mallory's calls answered a
second (by status, with the first details of each) and connections opened, the server's
CPU seconds by thread ("loop" is the event loop's; gRPC's poller and asyncio's helpers are
named after the process), and the CPU of the tailscaleds the flood goes through.
``--profile`` runs the server under cProfile (its cost inflates the server's CPU: use it to
see where the time goes, not for the numbers); ``--perf`` samples it with perf for half of
the flood. ``--elsewhere`` is the control: the same flood at a second server on
chat-server-2, so that only the machine's cores are shared with alice's server. ``--tree``
runs another tree's server (a git worktree: PYTHONPATH), for alternated before/after runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.pb import chat_pb2_grpc as pb_grpc

TSNETCHAT = str(Path(sys.executable).with_name("tsnetchat"))
JUNK = "Bearer tsn1.junk.junk"
VICTIM_RATE = 20.0  # alice's calls a second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def channel(target: str, proxy: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.http_proxy", f"http://{proxy}"), ("grpc.enable_http_proxy", 1),
        ("grpc.use_local_subchannel_pool", 1)])


def threads(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid``, summed by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: Counter[str] = Counter()
    for t in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (t / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            f = stat[stat.rindex(")") + 2:].split()
            out["loop" if t.name == str(pid) else name] += (int(f[11]) + int(f[12])) / tick
    return dict(out)


def process_cpu(pid: int) -> float:
    """CPU seconds so far of process ``pid`` (all its threads)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0) - before.get(k, 0), 2) for k in after
            if after.get(k, 0) - before.get(k, 0) >= 0.01}


async def victim(target: str, proxy: str, token: str, seconds: float) -> dict[str, Any]:
    ch = channel(target, proxy)
    stub = pb_grpc.ChatStub(ch)
    md = (("authorization", f"Bearer {token}"),)
    await stub.WhoAmI(pb.WhoAmIRequest(), metadata=md, timeout=20)  # (connected, admitted)
    lat: list[float] = []
    errors: Counter[str] = Counter()

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            await stub.WhoAmI(pb.WhoAmIRequest(), metadata=md, timeout=10)
            lat.append((time.perf_counter() - t0) * 1000)
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] += 1

    calls = []
    start = time.perf_counter()
    for i in range(int(seconds * VICTIM_RATE)):
        await asyncio.sleep(max(0.0, start + i / VICTIM_RATE - time.perf_counter()))
        calls.append(asyncio.create_task(one()))
    await asyncio.gather(*calls)
    await ch.close()
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [0.0] * 99
    return {"calls": len(lat), "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1),
            "max_ms": round(lat[-1], 1) if lat else None, "errors": dict(errors)}


async def flooder(target: str, proxy: str, conns: int, window: int, stop: asyncio.Event
                  ) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    said: dict[str, str] = {}  # the first details of each status
    opened = [0]

    async def conn_loop() -> None:
        while not stop.is_set():
            ch = channel(target, proxy)
            opened[0] += 1
            stub = pb_grpc.ChatStub(ch)
            lost = asyncio.Event()

            async def caller(stub: pb_grpc.ChatStub, lost: asyncio.Event) -> None:
                while not stop.is_set() and not lost.is_set():
                    try:
                        await stub.WhoAmI(pb.WhoAmIRequest(), metadata=(("authorization", JUNK),),
                                          timeout=10)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as e:
                        codes[e.code().name] += 1
                        said.setdefault(e.code().name, e.details() or "")
                        if e.code() == grpc.StatusCode.UNAVAILABLE:
                            lost.set()  # the connection is gone: a new channel

            await asyncio.gather(*(caller(stub, lost) for _ in range(window)))
            await ch.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conn_loop() for _ in range(conns)))
    took = time.perf_counter() - t0
    return {"per_second": {k: round(v / took) for k, v in codes.items()},
            "said": said, "connections_opened": opened[0],
            "cpu_s": round(process_cpu(os.getpid()), 2)}


def flood_worker(a: argparse.Namespace) -> None:
    """The flooder in a process of its own (so that alice's client is not slowed by it)."""
    async def go() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(a.seconds, stop.set)
        print(json.dumps(await flooder(a.target, a.proxy, a.conns, a.window, stop)),
              flush=True)
    asyncio.run(go())


async def start_server(a: argparse.Namespace, node: dict[str, Any], state: Path, *,
                       profile: str = "") -> tuple[subprocess.Popen[bytes], Path, str]:
    """``tsnetchat serve`` on a lab node: the process, its log, and its tailnet address."""
    port = free_port()
    argv = [TSNETCHAT, "serve", "--state-dir", str(state), "--socket", node["socket"],
            "--port", str(port)]
    if profile:
        argv = [sys.executable, "-c", "import cProfile, sys; "
                f"sys.path.insert(0, {a.tree or str(Path(__file__).resolve().parents[1])!r}); "
                "from tsnetchat.cli import main; "
                f"sys.argv = {['tsnetchat', *argv[1:]]!r}; "
                f"cProfile.run('main()', {profile!r})"]
    log = state.with_suffix(".log")
    server = subprocess.Popen(argv, stdout=open(log, "w"),  # noqa: SIM115, ASYNC230
                              stderr=subprocess.STDOUT,
                              env={**os.environ, **dict(e.split("=", 1) for e in a.env),
                                   **({"PYTHONPATH": a.tree} if a.tree else {})})
    deadline = time.monotonic() + 30
    while "serving on" not in log.read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        await asyncio.sleep(0.2)
    return server, log, f"{node['ips'][0]}:{port}"


def stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def run(a: argparse.Namespace) -> dict[str, Any]:
    nodes = json.loads((Path(a.lab) / "state.json").read_text())["nodes"]
    tmp = Path(tempfile.mkdtemp(prefix="refusal-flood-"))
    server, log, target = await start_server(a, nodes["chat-server"], tmp / "state",
                                             profile=a.profile)
    other = None  # --elsewhere: the flood's own server, on chat-server-2
    try:
        flood_target = target
        if a.elsewhere:
            other, _, flood_target = await start_server(a, nodes["chat-server-2"],
                                                        tmp / "other")
        token = subprocess.run([TSNETCHAT, "token", "issue", "alice@tailnet.test",
                                "--state-dir", str(tmp / "state")],
                               capture_output=True, text=True, check=True).stdout.strip()
        alice = nodes["alice-laptop"]["http_proxy"]
        out: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "seconds": a.seconds, "conns": a.conns, "window": a.window,
                               "tree": a.tree or str(Path(__file__).resolve().parents[1]),
                               "env": a.env, "elsewhere": a.elsewhere}
        c0 = threads(server.pid)
        out["quiet"] = {"alice": await victim(target, alice, token, a.seconds)}
        c1 = threads(server.pid)
        out["quiet"]["server_cpu"] = cpu_delta(c0, c1)
        flood = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", "--target", flood_target,
            "--proxy", nodes["mallory-laptop"]["http_proxy"], "--conns", str(a.conns),
            "--window", str(a.window), "--seconds", str(a.seconds + 3),
            stdout=asyncio.subprocess.PIPE)
        await asyncio.sleep(3)  # (its connections open)
        tailscaled = {n: nodes[n]["pid"] for n in ("chat-server", "chat-server-2",
                                                   "mallory-laptop")}
        if other is not None:
            tailscaled["flooded server"] = other.pid
        c2, t2 = threads(server.pid), {n: process_cpu(p) for n, p in tailscaled.items()}
        perf = None
        if a.perf:  # (sampled while alice is measured, for half of it)
            perf = await asyncio.create_subprocess_exec(
                "perf", "record", "-q", "-F", "499", "-g", "-o", a.perf, "-p", str(server.pid),
                "--", "sleep", str(a.seconds / 2), stderr=asyncio.subprocess.DEVNULL)
        out["flood"] = {"alice": await victim(target, alice, token, a.seconds)}
        if perf is not None:
            await perf.wait()
        c3, t3 = threads(server.pid), {n: process_cpu(p) for n, p in tailscaled.items()}
        out["flood"]["server_cpu"] = cpu_delta(c2, c3)
        out["flood"]["others_cpu"] = cpu_delta(t2, t3)
        stdout, _ = await flood.communicate()
        out["flood"]["mallory"] = json.loads(stdout)
        text = log.read_text()
        out["server_log"] = {"lines": text.count("\n"),
                             "closed": [ln for ln in text.splitlines() if "closed" in ln][:3]}
        return out
    finally:
        stop(server)
        if other is not None:
            stop(other)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default="/tmp/flood-lab")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--window", type=int, default=8, help="mallory's calls in flight a conn")
    ap.add_argument("--profile", default="")
    ap.add_argument("--elsewhere", action="store_true",
                    help="flood another server (on chat-server-2): the lab's shared cores alone")
    ap.add_argument("--perf", default="", help="perf record the server into this file")
    ap.add_argument("--json", default="")
    ap.add_argument("--tree", default="", help="run the server of this tree (a git worktree)")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--proxy", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        flood_worker(a)
        return
    out = asyncio.run(run(a))
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
