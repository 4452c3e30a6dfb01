#!/usr/bin/env python3
"""`make demo`: a local tailnet, the server, and clients chatting.

Starts the lab (headscale + chat-server, alice-laptop, bob-laptop, mallory-laptop), runs
`tsnetchat serve --enroll grant` on chat-server, has alice and bob get their own tokens with
`tsnetchat login` (mallory, without a grant, is refused), then:

* without a terminal on stdin: plays a short scripted conversation with the real CLI
  (send/tail/history, plus a stolen-token attempt that is refused) and exits 0;
* with a terminal: you are alice in `tsnetchat connect chat-server`; bob (a small bot on
  bob-laptop) answers. /quit to leave; everything is torn down afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
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
    env = {**os.environ, "XDG_CONFIG_HOME": str(home)} if home else None
    return subprocess.run([CLI, *args], capture_output=True, text=True, check=check, timeout=60,
                          env=env)


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
        print(f"   {who:6} $ tsnetchat send chat-server {' '.join(args)!r}  -> "
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
    say("building or reusing pinned tailscale/headscale (first time: a few minutes)")
    try:
        tailnet_lab.ensure_binaries()
    except tailnet_lab.LabError as e:
        print(f"cannot build the lab: {e}", file=sys.stderr)
        return 2
    say("starting a private tailnet: headscale + 4 userspace tailscaled nodes")
    with tailnet_lab.running_lab() as lab:
        for n in lab.nodes.values():
            print(f"   {n.name:15} {n.login:22} {n.ipv4:12} {n.dns_name}")
        state = Path(tempfile.mkdtemp(prefix="tsnetchat-demo-"))
        port = free_port()
        say(f"tsnetchat serve on chat-server (port {port})")
        server = subprocess.Popen([CLI, "serve", "--state-dir", str(state), "--socket",
                                   lab.nodes["chat-server"].socket, "--port", str(port),
                                   "--enroll", "grant"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert server.stdout is not None
            for line in server.stdout:
                print("   server: " + line.rstrip())
                if "ready:" in line:
                    break
                if server.poll() is not None:
                    return 1
            # Keep draining the server's log so it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in server.stdout or ()],
                             daemon=True).start()
            say("everyone asks for a token of their own (the policy grants alice and bob)")
            tokens = login(lab, port, state)
            if sys.stdin.isatty() and "--scripted" not in sys.argv:
                rc = interactive(lab, port, tokens)
            else:
                rc = scripted(lab, port, tokens)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
            import shutil

            shutil.rmtree(state, ignore_errors=True)
        say("tearing down the tailnet")
    return rc


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    sys.exit(main())
