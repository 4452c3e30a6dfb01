#!/usr/bin/env python3
"""A real NATS JetStream cluster on one machine: three nats-server nodes on loopback.

Test and demo infrastructure, not part of the shipped package (the package only speaks to
a NATS cluster someone else runs). It:

* builds a pinned ``nats-server`` from the Go module proxy (CGO off) into the same cache
  as the tailnet lab's binaries (``~/.cache/tsnetchat/tools/nats-server-<version>/``),
  once per pin, with ``go mod download`` + ``go build`` (``go install pkg@version`` asks
  the proxy for a version list, which this workplace's proxy refuses; see
  docs/tailnet-lab.md);
* starts three nodes (``n1``, ``n2``, ``n3``) with JetStream, one Raft cluster over
  loopback routes, each with its own client port, route port, monitoring port and store
  dir, and a user/password the clients must present;
* waits until every node is healthy and the JetStream meta group has a leader;
* stops, kills (SIGKILL) and restarts single nodes on the same ports and store dirs (the
  failure tests), and tears everything down on every exit path: children get
  ``PR_SET_PDEATHSIG`` (through ``setpriv``, as the tailnet lab's), so even a SIGKILLed
  pytest leaves no nats-server behind.

Command line::

    python scripts/nats_lab.py build              # build/reuse the binary, print its path
    python scripts/nats_lab.py up [--dir D]       # a cluster that outlives the command
    python scripts/nats_lab.py env [--dir D]      # TSNETCHAT_CLUSTER=... for a shell
    python scripts/nats_lab.py down [--dir D]     # stop it and delete its files

With ``--dir D`` the cluster's files and its state (``D/state.json``) are in D, so several
clusters can be up at once; without it, in a temp dir, with the state in ``--state``
(``.lab/nats.json`` under the current directory, or $TSNETCHAT_NATS_STATE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tailnet_lab import Running, cache_dir, die_with_parent, free_port

# The module's main package is its root. Rebuilt only when the pin changes.
PIN = ("github.com/nats-io/nats-server/v2", "v2.15.2")
CLUSTER_NAME = "tsnetchat"
USER = "tsnetchat"
ROUTE_USER = "route"  # the nodes' own user on their route ports (cluster { authorization })
DEFAULT_STATE = Path(os.environ.get("TSNETCHAT_NATS_STATE", Path.cwd() / ".lab" / "nats.json"))


class NatsLabError(RuntimeError):
    """The cluster could not be built or started; the message says what to do."""


_HANDED_OUT: set[int] = set()


def listen_port() -> int:
    """A free port below the kernel's ephemeral range, never one handed out before in this
    process. nats-server binds its three ports a moment after they are chosen; a port from
    ``free_port`` (bind to 0: the ephemeral range) can meanwhile become the source port of
    any outgoing connection: a full CI run saw "bind: address already in use" on a route
    port (2026-11-22). A port is free until its node starts, so two draws for one cluster
    could be the same port: one node's client and route ports were (2026-11-23; about 1 in
    600 clusters of nine ports)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    for _ in range(1000):
        port = random.randrange(10000, low) if low > 12000 else free_port()
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise NatsLabError("no free loopback port for a NATS node in 1,000 tries")


def log(msg: str) -> None:
    print(f"[nats-lab] {msg}", file=sys.stderr, flush=True)


# --- the binary ---------------------------------------------------------------------


def binary_path() -> Path:
    return cache_dir() / f"nats-server-{PIN[1]}" / "nats-server"


def find_binary() -> Path | None:
    p = binary_path()
    return p if p.is_file() and os.access(p, os.X_OK) else None


def ensure_binary() -> Path:
    """Build nats-server for the current pin if it is not cached (about a minute)."""
    found = find_binary()
    if found is not None:
        return found
    go = shutil.which("go")
    if go is None:
        raise NatsLabError(
            "Go is needed to build nats-server for the cluster tests but `go` is not on PATH. "
            "Install Go 1.26+ or set TSNETCHAT_CACHE to a dir holding "
            f"nats-server-{PIN[1]}/nats-server.")
    module, version = PIN
    out = binary_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false")
    log(f"building nats-server {version} from the Go module proxy (once per pin) ...")
    started = time.monotonic()

    def go_run(*args: str, cwd: str) -> str:
        proc = subprocess.run([go, *args], env=env, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NatsLabError(f"go {' '.join(args)} failed:\n"
                               f"{(proc.stderr or proc.stdout)[-4000:]}")
        return proc.stdout

    info = json.loads(go_run("mod", "download", "-json", f"{module}@{version}",
                             cwd=tempfile.gettempdir()))
    partial = out.with_suffix(".partial")
    go_run("build", "-trimpath", "-o", str(partial), ".", cwd=info["Dir"])
    partial.replace(out)
    log(f"built nats-server {version} in {time.monotonic() - started:.0f}s -> {out}")
    return out


# --- the cluster --------------------------------------------------------------------


@dataclass
class NatsNode:
    """One nats-server of the cluster. Ports stay the same across restarts."""

    name: str
    port: int
    route_port: int
    http_port: int
    dir: str
    pid: int = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class NatsCluster(Running):
    """Three (by default) JetStream nodes. Use as a context manager; ``stop()`` is
    idempotent and also stops nodes that were restarted."""

    def __init__(self, root: Path, *, binary: Path, size: int = 3, detached: bool = False,
                 password: str = "") -> None:
        self.root = root
        self.binary = binary
        self.detached = detached
        self.password = password or os.urandom(12).hex()
        self.nodes: list[NatsNode] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.startup_seconds = 0.0
        for i in range(1, size + 1):
            d = root / f"n{i}"
            self.nodes.append(NatsNode(name=f"n{i}", port=listen_port(),
                                       route_port=listen_port(), http_port=listen_port(),
                                       dir=str(d)))

    # what clients use --------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """All nodes, comma-separated: what ``serve --cluster`` takes."""
        return ",".join(self.urls)

    @property
    def user(self) -> str:
        return USER

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    # lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            self._write_config(n)
            self._spawn(n)
        self.wait_ready()
        self.startup_seconds = time.monotonic() - started
        log(f"cluster up in {self.startup_seconds:.1f}s: {self.url}")

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def _write_config(self, n: NatsNode) -> None:
        d = Path(n.dir)
        d.mkdir(parents=True, exist_ok=True)
        # Routes ask for credentials too: without them, any nats-server that reached a
        # route port joined the cluster and got every message (an attacker's run, 2026-11-25).
        routes = ", ".join(f'"nats-route://{ROUTE_USER}:{self.password}@127.0.0.1:'
                           f'{o.route_port}"' for o in self.nodes if o is not n)
        # JSON strings are valid in nats-server's config syntax.
        (d / "nats.conf").write_text(f"""
server_name: {n.name}
listen: "127.0.0.1:{n.port}"
http: "127.0.0.1:{n.http_port}"
jetstream {{
  store_dir: {json.dumps(str(d / "js"))}
  max_memory_store: 64MB
  max_file_store: 2GB
}}
cluster {{
  name: {CLUSTER_NAME}
  listen: "127.0.0.1:{n.route_port}"
  routes: [{routes}]
  authorization {{
    user: {ROUTE_USER}
    password: {json.dumps(self.password)}
  }}
}}
authorization {{
  user: {USER}
  password: {json.dumps(self.password)}
}}
""")

    def _spawn(self, n: NatsNode) -> None:
        logf = open(self.root / "logs" / f"{n.name}.log", "ab")  # noqa: SIM115 - with the process
        argv = [str(self.binary), "-c", str(Path(n.dir) / "nats.conf")]
        proc = subprocess.Popen(
            argv if self.detached else die_with_parent(argv),
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as the tailnet lab's nodes
        )
        logf.close()
        self._procs[n.name] = proc
        n.pid = proc.pid

    def running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL one node (a crash); ``start_node`` brings it back with its store."""
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop_node(self, name: str, timeout: float = 10) -> None:
        """Stop one node cleanly (SIGTERM: lame-duck off, flushes its store)."""
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_node(self, name: str, *, wait: bool = True) -> None:
        """(Re)start one node on its old ports and store dir."""
        n = self.node(name)
        if self.running(name):
            return
        self._spawn(n)
        if wait:
            self.wait_healthy([n])
            self.wait_settled()

    # readiness ---------------------------------------------------------------------

    def _get(self, n: NatsNode, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{n.http_port}{path}",
                                        timeout=2) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None
        except (OSError, ValueError):
            return 0, None

    def jsz(self, name: str) -> dict[str, Any] | None:
        """The node's JetStream report (monitoring endpoint /jsz), or None if it is down."""
        status, body = self._get(self.node(name), "/jsz")
        return body if status == 200 and isinstance(body, dict) else None

    def meta_leader(self) -> str:
        """The name of the JetStream meta leader as any running node reports it ("" if
        there is none, e.g. without a quorum)."""
        for n in self.nodes:
            if not self.running(n.name):
                continue
            body = self.jsz(n.name)
            leader = ((body or {}).get("meta_cluster") or {}).get("leader", "")
            if leader:
                return str(leader)
        return ""

    def stream_leader(self, stream: str, account: str = "$G") -> str:
        """The node leading a stream's Raft group, as a running node reports it ("" if none)."""
        for n in self.nodes:
            if not self.running(n.name):
                continue
            _, body = self._get(n, f"/jsz?acc={account}&streams=true")
            for acc in (body or {}).get("account_details") or []:
                for s in acc.get("stream_detail") or []:
                    leader = (s.get("cluster") or {}).get("leader", "")
                    if s.get("name") == stream and leader:
                        return str(leader)
        return ""

    def node_of(self, url_port: int) -> str:
        """The name of the node listening for clients on a port."""
        return next(n.name for n in self.nodes if n.port == url_port)

    def wait_healthy(self, nodes: list[NatsNode] | None = None, timeout: float = 60) -> None:
        """Wait until the nodes answer /healthz with 200 (JetStream current)."""
        pending = list(nodes if nodes is not None else self.nodes)
        deadline = time.monotonic() + timeout
        while pending:
            for n in list(pending):
                proc = self._procs.get(n.name)
                if proc is None or proc.poll() is not None:
                    raise NatsLabError(f"nats-server {n.name} exited:\n{self.tail_log(n.name)}")
                status, _ = self._get(n, "/healthz")
                if status == 200:
                    pending.remove(n)
            if pending and time.monotonic() > deadline:
                raise NatsLabError(f"nats-server {[n.name for n in pending]} not healthy after "
                                   f"{timeout:.0f}s:\n{self.tail_log(pending[0].name)}")
            if pending:
                time.sleep(0.1)

    def wait_settled(self, timeout: float = 30) -> None:
        """Wait until the meta leader hears from every running node within the last second
        (after a restart the meta layer may still count the node offline for a moment, and
        refuses to place a new R3 stream: 10005 "no suitable peers for placement")."""
        running = {n.name for n in self.nodes if self.running(n.name)}
        deadline = time.monotonic() + timeout
        while True:
            leader = self.meta_leader()
            meta = ((self.jsz(leader) if leader else None) or {}).get("meta_cluster") or {}
            fresh = {leader} | {r["name"] for r in meta.get("replicas") or []
                                if r.get("current") and not r.get("offline")
                                and r.get("active", 1 << 62) < 1_000_000_000}
            if leader and running <= fresh:
                return
            if time.monotonic() > deadline:
                raise NatsLabError(f"meta group not settled after {timeout:.0f}s: "
                                   f"running {sorted(running)}, heard from {sorted(fresh)}")
            time.sleep(0.1)

    def wait_ready(self, timeout: float = 60) -> None:
        """Every node healthy and the meta group has a leader (streams can be created)."""
        self.wait_healthy(timeout=timeout)
        deadline = time.monotonic() + timeout
        while not self.meta_leader():
            if time.monotonic() > deadline:
                raise NatsLabError(f"no JetStream meta leader after {timeout:.0f}s")
            time.sleep(0.1)

    def tail_log(self, name: str, lines: int = 30) -> str:
        p = self.root / "logs" / f"{name}.log"
        if not p.exists():
            return "(no log)"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])

    def to_state(self) -> dict[str, Any]:
        return {"root": str(self.root), "user": USER, "password": self.password,
                "url": self.url, "pids": [p.pid for p in self._procs.values()],
                "nodes": [asdict(n) for n in self.nodes]}


@contextlib.contextmanager
def running_cluster(root: Path | None = None, size: int = 3) -> Iterator[NatsCluster]:
    """Start a cluster in a temp dir (removed afterwards) and stop it on any exit."""
    binary = ensure_binary()
    tmp = Path(tempfile.mkdtemp(prefix="tsnetchat-nats-")) if root is None else root
    try:
        with NatsCluster(tmp, binary=binary, size=size) as cluster:
            yield cluster
    finally:
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)


# --- CLI --------------------------------------------------------------------------


def _state_path(args: argparse.Namespace) -> Path:
    """Where the cluster's state is: in ``--dir`` when given (an up with --dir kept it in
    the checkout's .lab/, and a second cluster could not be up; a kill -9 run, 2026-11-24)."""
    return Path(args.dir) / "state.json" if args.dir else Path(args.state)


def _cmd_up(args: argparse.Namespace) -> int:
    state_path = _state_path(args)
    if state_path.exists():
        print(f"a NATS cluster is already up ({state_path}); run `down` first", file=sys.stderr)
        return 1
    if args.dir and Path(args.dir).exists() and any(Path(args.dir).iterdir()):
        # (`down` deletes the dir it was given: only one `up` made)
        print(f"{args.dir} is not empty: give a new directory (down deletes it)",
              file=sys.stderr)
        return 1
    binary = ensure_binary()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="tsnetchat-nats-"))
    cluster = NatsCluster(root, binary=binary, detached=True)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(cluster.to_state(), indent=2))
    state_path.chmod(0o600)
    print(f"NATS cluster up in {cluster.startup_seconds:.1f}s; state in {state_path}")
    for n in cluster.nodes:
        print(f"  {n.name}  {n.url}  monitor http://127.0.0.1:{n.http_port}  pid {n.pid}")
    where = f" --dir {args.dir}" if args.dir else ""
    print(f"use it:  eval \"$({sys.argv[0]} env{where})\"")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    state_path = _state_path(args)
    if not state_path.exists():
        print("no NATS cluster is up", file=sys.stderr)
        return 0
    state = json.loads(state_path.read_text())
    for pid in state["pids"]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    time.sleep(1)
    for pid in state["pids"]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(state["root"], ignore_errors=True)
    state_path.unlink(missing_ok=True)  # (in --dir, gone with its root)
    print("NATS cluster down")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    state_path = _state_path(args)
    if not state_path.exists():  # (it was a FileNotFoundError's traceback)
        print(f"no NATS cluster is up ({state_path}): run `up` first", file=sys.stderr)
        return 1
    state = json.loads(state_path.read_text())
    print(f"export TSNETCHAT_CLUSTER={state['url']}")
    print(f"export TSNETCHAT_NATS_USER={state['user']}")
    print(f"export TSNETCHAT_NATS_PASSWORD={state['password']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--state", default=str(DEFAULT_STATE))
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    for name in ("up", "down", "env"):
        sub.add_parser(name).add_argument("--dir")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            print(ensure_binary())
            return 0
        return {"up": _cmd_up, "down": _cmd_down, "env": _cmd_env}[args.cmd](args)
    except NatsLabError as e:
        print(f"nats lab error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
