"""Shared fixtures (the classes they yield live in helpers.py).

* ``chat`` - a real grpc.aio tsnetchat server on a free loopback port with SQLite in a temp
  dir; identities come from FakeTailnet (a stand-in for tailscaled used only for chat logic).
* ``lab`` - the real tailnet lab (headscale + userspace tailscaled), once per session, for
  tests marked ``tailnet``. Without Go they skip loudly; with CI set they fail instead.
* ``lab_chat`` - an in-process server on the lab's chat-server node (real LocalAPI, real
  WhoIs, real IPN bus), reached by real tailnet peers.
* ``nats_cluster`` - a real three-node NATS JetStream cluster (scripts/nats_lab.py), fresh
  for each test marked ``cluster``; the same rule for a missing nats-server.
"""

from __future__ import annotations

import asyncio
import signal
import stat
import sys
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nats_lab  # noqa: E402
import tailnet_lab  # noqa: E402
from helpers import (  # noqa: E402
    Chat,
    LabChat,
    Pump,
    await_chain,
    chat_server,
    lab_server,
    need,
)

from tsnetchat.hub import Pacing  # noqa: E402


@pytest.fixture
async def chat(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Chat]:
    marker = request.node.get_closest_marker("server_config")
    overrides = marker.kwargs if marker else {}
    marker = request.node.get_closest_marker("pacing")
    pacing = Pacing(**marker.kwargs) if marker else None
    async with chat_server(tmp_path, pacing=pacing, **overrides) as c:
        yield c


def let_other_users_reach(root: Path) -> list[Path]:
    """Let other users read the checkout ``root`` (o+rx on it: git's and pip's modes inside
    already let them) and pass through each directory above it (o+x: not list), where they
    may not yet; return the directories changed.

    Some tests run this checkout as another user: the units' checks (a DynamicUser service
    must be able to read the installation, ``systemd.find_installation``, in
    test_operations.py and test_tsapi_units.py) and the unprivileged client in
    test_discovery.py, which imports the editable install from ``root`` (Python lists the
    directory to import from it). A checkout made by ``git clone . "$(mktemp -d)"``, as CI
    makes it, is mode 0700: 4 errors and 4 failures (2026-11-22)."""
    changed = []
    for d, wanted in ((root, stat.S_IROTH | stat.S_IXOTH),
                      *((p, stat.S_IXOTH) for p in root.parents)):
        mode = d.stat().st_mode
        if mode & wanted != wanted:
            try:
                d.chmod(mode | wanted)
            except OSError:
                continue  # (not ours to change: the tests that need it say what stopped them)
            changed.append(d)
    return changed


def pytest_configure(config: pytest.Config) -> None:
    for d in let_other_users_reach(ROOT):
        print(f"*** {d}: opened to other users (a service's, nobody), who run this "
              "checkout in some tests ***", file=sys.stderr)
    config.addinivalue_line("markers", "server_config(**kw): overrides for the chat and "
                                       "lab_chat fixtures")
    config.addinivalue_line("markers", "pacing(**kw): the chat fixture's hub Pacing")


@pytest.hookimpl(wrapper=True, optionalhook=True)  # (optional: `-p no:timeout` to debug)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, Any, Any]:
    """Before pytest-timeout fails a test, print every asyncio task's stack, not only the
    threads' (which it prints). A hang in an async test shows the event loop idle in
    ``select`` and nothing of the await that never returned: the way a cluster test hung
    once in a full CI run (2026-11-24) left no clue."""
    result = yield
    handler = signal.getsignal(signal.SIGALRM)
    if callable(handler):
        def dump_then_fail(signum: int, frame: Any) -> None:
            try:
                loop = asyncio._get_running_loop()
                if loop is not None:
                    print("+++ asyncio tasks at the timeout +++", file=sys.stderr)
                    for task in asyncio.all_tasks(loop):
                        print(f"--- {task!r}", file=sys.stderr)
                        for where in await_chain(task.get_coro()):
                            print(f"    {where}", file=sys.stderr)
            finally:
                handler(signum, frame)

        signal.signal(signal.SIGALRM, dump_then_fail)
    return result


# --- the real lab ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def lab() -> Iterator[tailnet_lab.Lab]:
    try:
        tailnet_lab.ensure_binaries()
    except tailnet_lab.LabError as e:
        need("the tailnet lab", str(e))
    with tailnet_lab.running_lab() as lab_:
        yield lab_


@pytest.fixture
async def lab_chat(lab: Any, tmp_path: Path, request: pytest.FixtureRequest
                   ) -> AsyncIterator[LabChat]:
    marker = request.node.get_closest_marker("server_config")
    async with lab_server(lab, tmp_path, **(marker.kwargs if marker else {})) as lc:
        yield lc


# --- a real NATS JetStream cluster (tests marked ``cluster``) ------------------------------


@pytest.fixture
def nats_cluster() -> Iterator[nats_lab.NatsCluster]:
    """Three fresh nats-server nodes with JetStream on loopback (under a second to start),
    stopped and removed afterwards; tests may kill, stop and restart nodes."""
    try:
        nats_lab.ensure_binary()
    except nats_lab.NatsLabError as e:
        need("nats-server", str(e))
    with nats_lab.running_cluster() as cluster:
        yield cluster


@pytest.fixture
async def pumps() -> AsyncIterator[list[Pump]]:
    """RoomSessions running in the background (helpers.pump), closed at the end."""
    made: list[Pump] = []
    yield made
    for p in made:
        await p.close()
