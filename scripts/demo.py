#!/usr/bin/env python3
"""`make demo`: a local tailnet, the server, and clients chatting.

Starts the lab (headscale + chat-server, alice-laptop, bob-laptop, mallory-laptop), runs
`tsnetchat serve --enroll grant` on chat-server, has alice and bob get their own tokens with
`tsnetchat login` (mallory, without a grant, is refused), then:

* without a terminal on stdin: plays a short scripted conversation with the real CLI
  (send/tail/history, plus a stolen-token attempt that is refused) and exits 0;
* with a terminal: you are alice in `tsnetchat connect chat-server`; bob (a small bot on
  bob-laptop) answers. /quit to leave; everything is torn down afterwards.

`make demo ARGS=--cluster` shows cluster mode instead (always scripted): a three-node NATS
JetStream cluster (scripts/nats_lab.py) and `serve --cluster` on chat-server and
chat-server-2. alice (logged in, her token stored) chats through chat-server with the
client core `tsnetchat connect` uses, bob follows through chat-server-2 with `tsnetchat
tail`; chat-server is SIGKILLed mid-conversation, alice's client goes on through
chat-server-2 with what she typed meanwhile, and the history shows every message once, in
order. Exits 0 when all of that held.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nats_lab  # noqa: E402
import tailnet_lab  # noqa: E402

CLI = str(Path(sys.executable).with_name("tsnetchat"))


def say(msg: str) -> None:
    print(f"\033[1m== {msg}\033[0m" if sys.stdout.isatty() else f"== {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, check: bool = True, home: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """The CLI; ``home`` is a person's config dir (where `login` keeps their token)."""
    env = person_env(home) if home else None
    return subprocess.run([CLI, *args], capture_output=True, text=True, check=check, timeout=60,
                          env=env)


def person_env(home: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CONFIG_HOME": str(home)}


def start_server(lab: tailnet_lab.Lab, node: str, state: Path, port: int,
                 env: dict[str, str] | None = None) -> subprocess.Popen[str] | None:
    """`tsnetchat serve --enroll grant` on ``node``, its log shown until it is ready, then
    drained in the background. None if it exits first."""
    server = subprocess.Popen([CLI, "serve", "--state-dir", str(state), "--socket",
                               lab.nodes[node].socket, "--port", str(port),
                               "--enroll", "grant"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {})})
    assert server.stdout is not None
    for line in server.stdout:
        print(f"   {node}: " + line.rstrip())
        if "ready:" in line:
            break
    if server.poll() is not None:
        return None
    # Keep draining the server's log so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in server.stdout or ()], daemon=True).start()
    return server


def stop_server(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def login(lab: tailnet_lab.Lab, port: int, state: Path) -> dict[str, str]:
    """alice and bob log in from their laptops; their tokens (read from where the client
    keeps them) serve the rest of the demo. mallory has no grant and is refused."""
    tokens = {}
    for who in ("alice", "bob", "mallory"):
        home = state / f"home-{who}"
        out = run("login", "chat-server", *node_args(lab, f"{who}-laptop", port), home=home,
                  check=False)
        shown = (out.stdout or out.stderr).strip().splitlines()[0]
        print(f"   {who:8} $ tsnetchat login chat-server  -> exit {out.returncode}: {shown}")
        if who != "mallory":
            kept = json.loads((home / "tsnetchat" / "tokens.json").read_text())
            tokens[who] = kept["servers"][0]["token"]
    return tokens


def node_args(lab: tailnet_lab.Lab, node: str, port: int) -> list[str]:
    n = lab.nodes[node]
    return ["--socket", n.socket, "--port", str(port), "--proxy", n.http_proxy]


def scripted(lab: tailnet_lab.Lab, port: int, tokens: dict[str, str]) -> int:
    say("bob follows #general from bob-laptop (tsnetchat tail)")
    tail = subprocess.Popen([CLI, "tail", "chat-server", "--count", "4", "--token", tokens["bob"],
                             *node_args(lab, "bob-laptop", port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    lines = [("alice", "alice-laptop", ["hi bob, this is alice over the tailnet"]),
             ("bob", "bob-laptop", ["hi alice! the server stamped who I am"]),
             ("alice", "alice-laptop", ["--action", "waves"]),
             ("bob", "bob-laptop", ["see you in #general"])]
    for who, node, args in lines:
        out = run("send", "chat-server", *args, "--token", tokens[who],
                  *node_args(lab, node, port))
        print(f"   {who:6} $ tsnetchat send chat-server {shlex.join(args)}  -> "
              f"{out.stdout.strip()}")
    out_text, err = tail.communicate(timeout=30)
    say("what bob's tail printed")
    print("\n".join("   " + line for line in out_text.splitlines()))
    said = [line for line in out_text.splitlines() if not line.startswith("──")]  # markers
    if tail.returncode != 0 or len(said) != 4:
        print(err, file=sys.stderr)
        return 1
    say("mallory tries alice's token from mallory-laptop (a stolen token)")
    stolen = run("whoami", "chat-server", "--token", tokens["alice"],
                 *node_args(lab, "mallory-laptop", port), check=False)
    print(f"   exit {stolen.returncode}: {stolen.stderr.strip()}")
    if stolen.returncode != 5:
        return 1
    say("a local process that did not come through tailscaled")
    direct = run("whoami", "chat-server", "--token", tokens["alice"], "--address",
                 f"127.0.0.1:{port}", check=False)
    print(f"   exit {direct.returncode}: {direct.stderr.strip()}")
    if direct.returncode != 5:
        return 1
    say("history survives: tsnetchat history chat-server")
    hist = run("history", "chat-server", "--token", tokens["bob"],
               *node_args(lab, "bob-laptop", port))
    print("\n".join("   " + line for line in hist.stdout.splitlines()))
    say("demo finished: all of that went through real tailscaled nodes and headscale")
    return 0


def interactive(lab: tailnet_lab.Lab, port: int, tokens: dict[str, str]) -> int:
    bot = subprocess.Popen([sys.executable, __file__, "--bob-bot", str(port), tokens["bob"],
                            json.dumps({"socket": lab.nodes["bob-laptop"].socket,
                                        "http_proxy": lab.nodes["bob-laptop"].http_proxy})],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    say("you are alice on alice-laptop; bob (a bot) will answer. /help, /quit to end")
    time.sleep(1)
    try:
        return subprocess.call([CLI, "connect", "chat-server", "--token", tokens["alice"],
                                *node_args(lab, "alice-laptop", port)])
    finally:
        bot.terminate()
        bot.wait()


def bot_main(argv: list[str]) -> None:
    port, token, node = int(argv[0]), argv[1], json.loads(argv[2])
    from tsnetchat.client import RoomSession, connect

    async def conn() -> object:
        return await connect("chat-server", token, socket=node["socket"], port=port,
                             proxy=f"http://{node['http_proxy']}")

    async def main() -> None:
        # Start after the room's current last message: answer only what is said from now on.
        first = await conn()
        rooms = await first.list_rooms()  # type: ignore[attr-defined]
        await first.close()  # type: ignore[attr-defined]
        last = next((r.last_id for r in rooms.rooms if r.name == "general"), 0)
        session = RoomSession(conn, "general", after_id=last)
        async for ev in session.events():
            m = ev.message
            if ev.kind == "message" and m is not None and m.sender.login != "bob@tailnet.test":
                session.send(f"got it, {m.sender.display_name}: {m.text!r} (message #{m.id})")
            elif (ev.kind == "presence" and ev.presence and ev.presence.kind == 1
                  and ev.presence.who.login != "bob@tailnet.test"):
                session.send(f"hi {ev.presence.who.display_name}! I'm bob, on bob-laptop.")

    asyncio.run(main())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--bob-bot":
        bot_main(sys.argv[2:])
        return 0
    if "--cluster" in sys.argv:
        return cluster_main()
    say("building or reusing pinned tailscale/headscale (first time: a few minutes)")
    try:
        tailnet_lab.ensure_binaries()
    except tailnet_lab.LabError as e:
        print(f"cannot build the lab: {e}", file=sys.stderr)
        return 2
    say(f"starting a private tailnet: headscale + {len(tailnet_lab.NODES)} userspace "
        "tailscaled nodes")
    with tailnet_lab.running_lab() as lab:
        for n in lab.nodes.values():
            print(f"   {n.name:15} {n.login:22} {n.ipv4:12} {n.dns_name}")
        state = Path(tempfile.mkdtemp(prefix="tsnetchat-demo-"))
        port = free_port()
        say(f"tsnetchat serve on chat-server (port {port})")
        server = start_server(lab, "chat-server", state / "server", port)
        if server is None:
            return 1
        try:
            say("everyone asks for a token of their own (the policy grants alice and bob)")
            tokens = login(lab, port, state)
            if sys.stdin.isatty() and "--scripted" not in sys.argv:
                rc = interactive(lab, port, tokens)
            else:
                rc = scripted(lab, port, tokens)
        finally:
            stop_server(server)
            shutil.rmtree(state, ignore_errors=True)
        say("tearing down the tailnet")
    return rc


# --- `make demo ARGS=--cluster`: a failover -------------------------------------------


def cluster_main() -> int:
    say("building or reusing pinned tailscale/headscale and nats-server (first time: minutes)")
    try:
        tailnet_lab.ensure_binaries()
        nats_lab.ensure_binary()
    except (tailnet_lab.LabError, nats_lab.NatsLabError) as e:
        print(f"cannot build the lab: {e}", file=sys.stderr)
        return 2
    say("starting a private tailnet (headscale + userspace tailscaled nodes) and a "
        "three-node NATS JetStream cluster")
    with tailnet_lab.running_lab() as lab, nats_lab.running_cluster() as nats:
        for n in lab.nodes.values():
            print(f"   {n.name:15} {n.login:22} {n.ipv4:12} {n.dns_name}")
        print(f"   NATS: {nats.url}")
        state = Path(tempfile.mkdtemp(prefix="tsnetchat-demo-"))
        env = {"TSNETCHAT_CLUSTER": nats.url, "TSNETCHAT_NATS_USER": nats.user,
               "TSNETCHAT_NATS_PASSWORD": nats.password}
        ports = {"chat-server": free_port(), "chat-server-2": free_port()}
        servers: dict[str, subprocess.Popen[str]] = {}
        try:
            for i, (node, port) in enumerate(ports.items(), 1):
                say(f"tsnetchat serve --cluster on {node} (port {port})")
                started = start_server(lab, node, state / f"server-{i}", port, env)
                if started is None:
                    return 1
                servers[node] = started
            say("alice logs in through chat-server, bob through chat-server-2 (no --token "
                "from here on: their clients use the tokens they keep)")
            for who, node in (("alice", "chat-server"), ("bob", "chat-server-2")):
                out = run("login", node, *node_args(lab, f"{who}-laptop", ports[node]),
                          home=state / f"home-{who}", check=False)
                shown = (out.stdout or out.stderr).strip().splitlines()[0]
                print(f"   {who:6} $ tsnetchat login {node}  -> exit {out.returncode}: {shown}")
                if out.returncode != 0:
                    return 1
            total = 7  # alice's messages and bob's answer (``failover``)
            say("bob follows #general through chat-server-2 (tsnetchat tail)")
            tail = subprocess.Popen([CLI, "tail", "chat-server-2", "--count", str(total),
                                     *node_args(lab, "bob-laptop", ports["chat-server-2"])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=person_env(state / "home-bob"))
            try:
                rc = asyncio.run(failover(lab, ports, state, servers["chat-server"], tail,
                                          total))
            finally:
                if tail.poll() is None:
                    tail.kill()
                    tail.wait()
        finally:
            for server in servers.values():
                stop_server(server)
            shutil.rmtree(state, ignore_errors=True)
        say("tearing down the tailnet and the NATS cluster")
    return rc


async def failover(lab: tailnet_lab.Lab, ports: dict[str, int], state: Path,
                   one: subprocess.Popen[str], tail: subprocess.Popen[str], total: int) -> int:
    """alice chats through chat-server with the client core of `tsnetchat connect`; it is
    killed; she goes on through chat-server-2. 0 when bob saw everything once, in order."""
    os.environ["XDG_CONFIG_HOME"] = str(state / "home-alice")  # where her token is kept
    from tsnetchat.client import RoomSession, link_for

    first, typed_after = ["hi bob, alice here, through chat-server",
                          "the history is on a NATS JetStream cluster",
                          "watch: chat-server is about to be killed"], [
                          "typed while chat-server was gone", "still here, through "
                          "chat-server-2", "nothing lost, nothing doubled"]
    assert total == len(first) + len(typed_after) + 1  # and bob's answer
    a = lab.nodes["alice-laptop"]
    link = link_for("chat-server", None, socket=a.socket, port=ports["chat-server"],
                    proxy=f"http://{a.http_proxy}")
    session = RoomSession(link, "general", max_backoff=1.0)
    acked: dict[str, int] = {}
    lost_at = 0.0

    async def pump() -> None:
        nonlocal lost_at
        async for ev in session.events():
            where = link.target.name if link.target else "?"
            if ev.kind == "sent" and ev.outgoing is not None:
                acked[ev.outgoing.text] = ev.message_id
                print(f"   alice's client: stored as #{ev.message_id} via {where}: "
                      f"{ev.outgoing.text!r}")
            elif ev.kind == "state" and session.connected:
                back = (f" after {time.monotonic() - lost_at:.1f}s, nothing missed"
                        if lost_at else "")
                print(f"   alice's client: connected through {where}{back}")
            elif ev.kind == "state" and ev.error is not None and not lost_at:
                lost_at = time.monotonic()
                print(f"   alice's client: {ev.error}; going on through another server")
            elif ev.kind == "fatal":
                print(f"   alice's client: gave up: {ev.text}")
                return

    task = asyncio.create_task(pump())
    try:
        say("alice chats through chat-server")
        for text in first:
            session.send(text)
        await until(lambda: all(t in acked for t in first), 30)
        say("SIGKILL chat-server mid-conversation; alice keeps typing")
        one.send_signal(signal.SIGKILL)
        await asyncio.to_thread(one.wait)
        for text in typed_after:
            session.send(text)
        await until(lambda: all(t in acked for t in typed_after), 60)
        out = await asyncio.to_thread(
            run, "send", "chat-server-2", "welcome to chat-server-2, alice",
            *node_args(lab, "bob-laptop", ports["chat-server-2"]), home=state / "home-bob",
            check=False)
        print(f"   bob    $ tsnetchat send chat-server-2 ...  -> {out.stdout.strip()}")
    finally:
        await session.close()
        task.cancel()
        await link.close()
    try:
        out_text, err = await asyncio.to_thread(tail.communicate, timeout=30)
    except subprocess.TimeoutExpired:
        tail.kill()
        out_text, err = await asyncio.to_thread(tail.communicate)
    say("what bob's tail (through chat-server-2) printed")
    print("\n".join("   " + line for line in out_text.splitlines()))
    hist = await asyncio.to_thread(
        run, "history", "chat-server-2", "--json",
        *node_args(lab, "bob-laptop", ports["chat-server-2"]), home=state / "home-bob",
        check=False)
    ids = [m["id"] for m in json.loads(hist.stdout or "[]")]
    texts = [m["text"] for m in json.loads(hist.stdout or "[]")]
    whole = ids == list(range(1, total + 1)) and len(set(texts)) == total
    say(f"history on chat-server-2: ids {ids}: "
        f"{'every message once, in order' if whole else 'NOT as expected'}")
    if tail.returncode != 0 or not whole or len(acked) != len(first) + len(typed_after):
        print(err, file=sys.stderr)
        return 1
    say("demo finished: one server died, the conversation went on through the other")
    return 0


async def until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {timeout:g}s")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    sys.exit(main())
