"""Finding the server on the tailnet, and choosing how to dial it.

``discover`` tries three sources, in this order, and stops at the first that finds the peer:

1. **tailscaled's LocalAPI**, read-only (``GET status``), at ``--socket`` if given, else at
   the platform's known places: the Linux sockets (``LINUX_SOCKETS``), the open-source
   tailscaled's socket on macOS, and the macOS app's local TCP endpoint with its password,
   found the way Tailscale's own CLI finds it (``macos_app_endpoint``). Windows' named pipe
   is not tried: step 2 covers Windows.
2. **the tailscale command** (``tailscale status --json``), which knows how to reach its
   daemon on every platform, including the macOS and Windows apps. It prints the same status
   as step 1, so it runs only when step 1 got none.
3. **the operating system's resolver**: with MagicDNS on, ``chat-server`` and its full name
   resolve to tailnet addresses. Only answers inside Tailscale's ranges (``TAILNET_RANGES``)
   are accepted, so a look-alike host on the LAN never sees a token.

A step that lists the tailnet's peers and does not find the name gives "did you mean"; the
error names every step tried and why each failed. A peer that status shows offline ends the
search (there is no point asking the resolver).

``route`` then chooses how to reach the peer, and tries it once so failures are explained
before gRPC's own messages would be:

* TUN node (or found by the resolver, which means MagicDNS routes here): dial directly;
* a proxy given (``--proxy``/TSNETCHAT_PROXY): an HTTP CONNECT proxy through gRPC's own
  support, a SOCKS5 proxy through a private bridge socket;
* userspace node without a proxy: LocalAPI ``dial`` through the socket step 1 read (measured
  with tailscale v1.102.3: dial needs only the read access every local user has on Linux);
  with no such socket (the tailscale command found the peer) or a tailscaled that refuses
  the dial, an explanation of the two ways to get a proxy-less route.

Every name reported to people (``Step.detail``, errors) is plain text; every failure is a
TailnetError (exit 4), except a server that is not listening: ServerUnavailable (exit 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import errno
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import httpx

from .errors import (
    ConfigError,
    InvalidInput,
    LocalAPIUnavailable,
    PeerNotFound,
    ServerUnavailable,
    TailnetError,
    TailnetNotReady,
)
from .netio import splice
from .tailnet import LocalAPI, PeerInfo, Status, parse_status

# Tailscale hands out addresses only from these ranges (CGNAT v4, its ULA v6 prefix).
TAILNET_RANGES = (ipaddress.ip_network("100.64.0.0/10"),
                  ipaddress.ip_network("fd7a:115c:a1e0::/48"))
# Where tailscaled's LocalAPI socket lives on Linux (and the BSDs): the default, the same
# under /run, Synology DSM 7 and 6, gokrazy. As Tailscale's paths.DefaultTailscaledSocket.
LINUX_SOCKETS = ("/var/run/tailscale/tailscaled.sock", "/run/tailscale/tailscaled.sock",
                 "/var/packages/Tailscale/var/tailscaled.sock",
                 "/var/packages/Tailscale/etc/tailscaled.sock",
                 "/perm/tailscaled/tailscaled.sock")
MACOS_SOCKET = "/var/run/tailscaled.socket"  # the open-source tailscaled on macOS
MACOS_SHARED_DIR = "/Library/Tailscale"  # the standalone app: ipnport + sameuserproof-PORT
MACOS_CLI = "/Applications/Tailscale.app/Contents/MacOS/Tailscale"
_HOST = "local-tailscaled.sock"  # the Host tailscaled's LocalAPI insists on

# A status read or a `tailscale status` that takes longer is reported as not answering.
STATUS_TIMEOUT = 5.0
CLI_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0
# How long the one trial connection may take. Tailscale's own proxies give up a dial after
# 5 s (net/socks5), so ours waits a little longer to hear their answer rather than guess.
PROBE_TIMEOUT = 8.0


# --- what discovery reports ------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One line of the discovery report (``connect -v``, ``doctor``)."""

    name: str  # "1. LocalAPI", "2. tailscale command", "3. resolver", "dial"
    ok: bool | None  # True: found/decided, False: failed, None: not needed
    detail: str

    def line(self) -> str:
        mark = {True: "✔", False: "✘", None: "-"}[self.ok]
        return f"{mark} {self.name:22} {self.detail}"


Report = Callable[[Step], None]


@dataclass(frozen=True)
class ServerNode:
    """The server's node as this client knows it."""

    short_name: str
    dns_name: str  # FQDN without the trailing dot; "" when unknown
    ips: tuple[str, ...]
    node_id: str = ""  # stable node id; "" when only the resolver found it
    online: bool | None = None  # None: unknown (the resolver cannot tell)
    this_machine: bool = False  # the name is this machine's own node, not a peer


@dataclass(frozen=True)
class Found:
    node: ServerNode
    ip: str  # the tailnet address to dial
    tun: bool | None  # the local node has a TUN device; None: unknown
    socket: str  # the LocalAPI unix socket that answered ("" if none), for LocalAPI dial
    via: str  # which step found it


@dataclass(frozen=True)
class Target:
    """Where and how to reach the server."""

    name: str  # what to show people
    host: str  # MagicDNS FQDN or IP
    ip: str
    port: int
    mode: str  # "direct", "proxy" (HTTP CONNECT), "socks5", "localapi", "address"
    proxy: str = ""  # proxy URL for "proxy" and "socks5"
    socket: str = ""  # LocalAPI socket for "localapi"
    node: ServerNode | None = None


def is_tailnet_ip(value: str) -> bool:
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in TAILNET_RANGES)


# --- matching a name against status ------------------------------------------------------


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def find_peer(status: Status, name: str) -> PeerInfo:
    """Match ``name`` against peers: IP, full MagicDNS name, short name, or host name.

    Raises PeerNotFound with the closest names, or TailnetError when the peer is offline.
    """
    want = _norm(name)
    try:
        ip = str(ipaddress.ip_address(want))
    except ValueError:
        ip = ""
    candidates = [*status.peers, status.self_node]
    for p in candidates:
        if (ip and ip in p.ips) or want in (_norm(p.dns_name), p.short_name.lower(),
                                            p.host_name.lower()):
            if p is not status.self_node and not p.online:
                # (Go's zero time when tailscaled never saw it: "last seen 0001-01-01T00:00:00Z",
                # an operator's run, 2026-11-24)
                seen = p.last_seen if p.last_seen and not p.last_seen.startswith("0001-") \
                    else "never"
                raise TailnetError(f"{p.short_name} is on the tailnet but offline (last seen "
                                   f"{seen}); is the server's machine up?")
            return p
    if not ip and "." not in want and not status.magic_dns_enabled:
        raise PeerNotFound(f"no peer named {name!r}, and MagicDNS is off on this tailnet: use "
                           "the server's tailnet IP, or turn MagicDNS on")
    names = sorted({p.short_name for p in status.peers})
    close = difflib.get_close_matches(want.split(".")[0], names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        f"; peers: {', '.join(names[:10])}" if names else "; this node sees no peers")
    raise PeerNotFound(f"no peer named {name!r} on this tailnet{hint}")


def _node_of(p: PeerInfo, *, this_machine: bool = False) -> ServerNode:
    return ServerNode(short_name=p.short_name, dns_name=p.dns_name.rstrip("."), ips=p.ips,
                      node_id=p.node_id, online=p.online, this_machine=this_machine)


def _pick_ip(ips: Sequence[str]) -> str:
    return next((i for i in ips if ":" not in i), ips[0] if ips else "")


# --- step 1: the LocalAPI at its known places ---------------------------------------------


@dataclass(frozen=True)
class Place:
    """Somewhere a LocalAPI may answer: a unix socket, or the macOS app's TCP port."""

    where: str
    socket: str = ""
    port: int = 0
    password: str = field(default="", repr=False)


def parse_sameuserproof(name: str) -> tuple[int, str] | None:
    """``sameuserproof-<port>-<password>`` (a file name the macOS app shares) -> both."""
    prefix = "sameuserproof-"
    base = os.path.basename(name)
    if not base.startswith(prefix):
        return None
    port, sep, password = base[len(prefix):].partition("-")
    if not sep or not port.isdigit() or not password:
        return None
    return int(port), password.strip()


def parse_lsof(output: str) -> tuple[int, str] | None:
    """The macOS App Store app's port and password from ``lsof -F`` output: it holds a file
    named ``.../.tailscale.ipn.macos/sameuserproof-<port>-<password>`` open."""
    marker = ".tailscale.ipn.macos/"
    for line in output.splitlines():
        i = line.find(marker + "sameuserproof-")
        if i >= 0:
            found = parse_sameuserproof(line[i + len(marker):])
            if found:
                return found
    return None


def read_macsys(shared_dir: str = MACOS_SHARED_DIR) -> tuple[int, str] | None:
    """The standalone macOS app: ``ipnport`` is a symlink whose target is the port, and
    ``sameuserproof-<port>`` holds the password."""
    try:
        port = os.readlink(os.path.join(shared_dir, "ipnport"))
        password = Path(shared_dir, f"sameuserproof-{port}").read_text().strip()
    except (OSError, ValueError):
        return None
    return (int(port), password) if port.isdigit() and password else None


def macos_app_endpoint(env: Mapping[str, str] = os.environ,
                       shared_dir: str = MACOS_SHARED_DIR) -> Place | None:
    """Where the macOS Tailscale app's LocalAPI listens, as Tailscale's CLI finds it: the
    shared dir the app gives its CLI (TS_MACOS_CLI_SHARED_DIR), the App Store app's open
    file (lsof), then the standalone app's files."""
    found: tuple[int, str] | None = None
    shared = env.get("TS_MACOS_CLI_SHARED_DIR", "")
    if shared:
        with contextlib.suppress(OSError):
            found = next(filter(None, map(parse_sameuserproof, os.listdir(shared))), None)
    if found is None and shutil.which("lsof"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["lsof", "-n", "-a", f"-u{os.getuid()}", "-c", "IPNExtension",
                                  "-F"], capture_output=True, text=True, timeout=5).stdout
            found = parse_lsof(out)
    if found is None:
        found = read_macsys(shared_dir)
    if found is None:
        return None
    port, password = found
    return Place(where=f"127.0.0.1:{port} (the macOS app)", port=port, password=password)


def localapi_places(explicit: str = "", platform: str = sys.platform
                    ) -> tuple[list[Place], list[str]]:
    """The places to try, and the known places that are absent (for the report)."""
    if explicit:
        return [Place(where=explicit, socket=explicit)], []
    if platform == "win32":
        return [], ["not tried on Windows (the tailscale command below reaches the app)"]
    # The report names only the usual places as absent, not every appliance's.
    sockets, usual = ([MACOS_SOCKET], 1) if platform == "darwin" else (list(LINUX_SOCKETS), 2)
    places = [Place(where=s, socket=s) for s in sockets if os.path.exists(s)]
    absent = [f"no socket at {s}" for s in sockets[:usual] if not os.path.exists(s)]
    if platform == "darwin":
        app = macos_app_endpoint()
        if app is not None:
            places.append(app)
        else:
            absent.append("no macOS app endpoint (sameuserproof file)")
    return places, absent


def _why(e: BaseException) -> str:
    """The root cause of a failed status read, in words (httpx wraps the OSError twice)."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, PermissionError):
        return "permission denied (this user may not use that socket)"
    if isinstance(cause, FileNotFoundError):
        return "no such socket"
    if isinstance(cause, ConnectionRefusedError):
        return "nothing answers there (a stale socket? is tailscaled running?)"
    return str(e)


async def read_status(place: Place) -> Status:
    """GET status at one place. Raises LocalAPIUnavailable (cause attached) or TailnetError."""
    if place.socket:
        async with LocalAPI(place.socket, timeout=STATUS_TIMEOUT) as api:
            return await api.status()
    try:
        async with httpx.AsyncClient(timeout=STATUS_TIMEOUT) as client:
            r = await client.get(f"http://127.0.0.1:{place.port}/localapi/v0/status",
                                 headers={"Host": _HOST}, auth=("", place.password))
    except (httpx.TransportError, OSError) as e:
        raise LocalAPIUnavailable(f"{place.where} is not answering ({type(e).__name__})") from e
    if r.status_code >= 400:
        raise TailnetError(f"{place.where} answered {r.status_code}: {r.text.strip()[:200]}")
    try:
        return parse_status(r.json())
    except (json.JSONDecodeError, AttributeError) as e:
        raise TailnetError(f"{place.where} sent something that is not a status") from e


# --- step 2: the tailscale command --------------------------------------------------------


def tailscale_commands(platform: str = sys.platform) -> list[str]:
    """The tailscale CLI: on PATH, plus where the macOS and Windows apps install it."""
    found = [p for p in [shutil.which("tailscale")] if p]
    extra: list[str] = []
    if platform == "darwin":
        extra = [MACOS_CLI]
    elif platform == "win32":
        extra = [os.path.join(os.environ.get("PROGRAMFILES", r"C:\Program Files"),
                              "Tailscale", "tailscale.exe")]
    return found + [p for p in extra if os.path.exists(p) and p not in found]


def _run_status(cmd: str) -> Status:
    try:
        out = subprocess.run([cmd, "status", "--json"], capture_output=True, text=True,
                             timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LocalAPIUnavailable(f"`{cmd} status --json` did not finish in "
                                  f"{CLI_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise LocalAPIUnavailable(f"cannot run {cmd}: {e.strerror}") from None
    if out.returncode != 0:
        first = next((ln.strip() for ln in (out.stderr or out.stdout).splitlines()
                      if ln.strip()), f"exit {out.returncode}")
        raise LocalAPIUnavailable(f"`{cmd} status --json` failed: {first}")
    try:
        return parse_status(json.loads(out.stdout))
    except (json.JSONDecodeError, AttributeError):
        raise TailnetError(f"`{cmd} status --json` printed something that is not a "
                           "status") from None


# --- step 3: the resolver -----------------------------------------------------------------


async def resolve_name(name: str) -> list[str]:
    """The OS resolver's addresses for ``name`` (an IP literal resolves to itself).

    Raises PeerNotFound with the resolver's own words when it has no answer.
    """
    host = name.strip().rstrip(".").strip("[]")
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(host))]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    except socket.gaierror as e:
        raise PeerNotFound(f"{name!r} does not resolve ({e.strerror})") from None
    except UnicodeError:  # a name IDNA cannot encode (check_name stops the usual ones)
        raise PeerNotFound(f"{name!r} is not a name the resolver can look up") from None
    except TimeoutError:
        raise PeerNotFound(f"the resolver did not answer for {name!r} in "
                           f"{RESOLVE_TIMEOUT:.0f}s") from None
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0]).split("%")[0]
        if addr not in out:
            out.append(addr)
    return out


MAGICDNS_ADVICE = (
    "With MagicDNS, this machine's resolver (100.100.100.100) knows tailnet names; MagicDNS "
    "may be off on the tailnet (admin console, DNS) or on this machine (`tailscale set "
    "--accept-dns=true`). Or give the server's tailnet IP")


# --- discovery ----------------------------------------------------------------------------


async def discover(name: str, *, socket: str = "", report: Report | None = None) -> Found:
    """Find ``name`` (short name, full MagicDNS name or tailnet IP); see the module doc.

    Raises PeerNotFound (with "did you mean" when a step could list peers), TailnetNotReady,
    or TailnetError (offline, or the resolver answered outside the tailnet).
    """
    check_name(name)
    steps: list[Step] = []

    def note(step: Step) -> None:
        steps.append(step)
        if report is not None:
            report(step)

    status: Status | None = None
    status_socket = ""
    hint: PeerNotFound | None = None
    not_ready: TailnetNotReady | None = None

    def match(st: Status, label: str, where: str, query: str = name) -> Found | None:
        nonlocal hint, not_ready
        mode = "TUN" if st.tun else "userspace networking"
        if not st.running:
            state = st.backend_state or "not running"
            not_ready = TailnetNotReady(f"the local tailscaled is {state}; run `tailscale up`")
            note(Step(label, False, f"{where}: {not_ready}"))
            return None
        try:
            peer = find_peer(st, query)
        except PeerNotFound as e:
            hint = e  # the headline if nothing finds it: the step says only what it saw
            # (the suggestions were printed twice, in the headline and in this step: a new
            # user's day, 2026-11-24)
            n = len(st.peers)
            note(Step(label, False, f"{where}: not among the {n} peer{'' if n == 1 else 's'} "
                                    "it lists" + ("" if st.magic_dns_enabled else
                                                  ", and MagicDNS is off")))
            return None
        except TailnetError as e:  # offline: final, the resolver cannot do better
            note(Step(label, False, f"{where}: {e}"))
            raise TailnetError(_explain(str(e), steps)) from None
        node = _node_of(peer, this_machine=peer is st.self_node)
        note(Step(label, True, f"{where} ({mode}): {node.short_name} is "
                               f"{node.dns_name or '?'} {', '.join(node.ips)}, "
                               + ("this machine" if node.this_machine else "online")))
        for later in ("2. tailscale command", "3. resolver"):
            if later > label:
                note(Step(later, None, "not needed"))
        return Found(node=node, ip=_pick_ip(node.ips), tun=st.tun, socket=status_socket,
                     via=label)

    # 1. the LocalAPI
    places, absent = localapi_places(socket)
    failures = list(absent)
    for place in places:
        try:
            status = await read_status(place)
        except (LocalAPIUnavailable, TailnetError) as e:
            failures.append(f"{place.where}: {_why(e)}")
            continue
        status_socket = place.socket
        found = match(status, "1. LocalAPI", place.where)
        if found is not None:
            return found
        break
    if status is None:
        if socket and failures and "is tailscaled running?" not in failures[-1].lower():
            # (asked twice in one line: a newcomer, 2026-11-24; LocalAPI's own words begin
            # the question with a capital: a daily user, 2026-11-25)
            failures[-1] += (". Is tailscaled running? (systemctl status tailscaled, or "
                             "--socket)")
        note(Step("1. LocalAPI", False, "; ".join(failures) or "no known place"))

    # 2. the tailscale command
    if status is not None:
        note(Step("2. tailscale command", None, "not needed: the LocalAPI answered"))
    else:
        cmds = tailscale_commands()
        cli_failures = []
        for cmd in cmds:
            try:
                status = await asyncio.to_thread(_run_status, cmd)
            except (LocalAPIUnavailable, TailnetError) as e:
                cli_failures.append(str(e))
                continue
            found = match(status, "2. tailscale command", f"`{cmd} status`")
            if found is not None:
                return found
            break
        if status is None:
            note(Step("2. tailscale command", False,
                      "; ".join(cli_failures) or "no `tailscale` command on PATH"))

    # 3. the resolver
    label = "3. resolver"
    try:
        addrs = await resolve_name(name)
    except PeerNotFound as e:
        detail = str(e) if status is not None else f"{e}. {MAGICDNS_ADVICE}"
        note(Step(label, False, detail))
        if not_ready is not None:
            raise TailnetNotReady(_explain(str(not_ready), steps)) from None
        # (with this machine's tailscaled stopped, the headline was that the server could
        # not be found, and the cause only in step 1: a new user's day, 2026-11-24)
        head = str(hint) if hint else (
            f"cannot find {name!r}: this machine's tailscaled does not answer (is it running? "
            "systemctl status tailscaled, or --socket)" if status is None and socket else
            f"cannot find {name!r} on the tailnet; no step could list this tailnet's peers, "
            "so there are no suggestions")
        raise PeerNotFound(_explain(head, steps)) from None
    tailnet = [a for a in addrs if is_tailnet_ip(a)]
    if not tailnet:
        msg = (f"{name!r} resolves to {', '.join(addrs)}, which is not a tailnet address "
               "(100.64.0.0/10, fd7a:115c:a1e0::/48); tsnetchat only dials the tailnet, so "
               "your token goes nowhere else. Is there another host of that name on your "
               "network? Use the server's MagicDNS name or tailnet IP")
        note(Step(label, False, msg))
        raise TailnetError(_explain(f"{hint}; and {msg}" if hint else msg, steps))
    if status is not None and status.running:
        known = next((p for p in [*status.peers, status.self_node]
                      if set(p.ips) & set(tailnet)), None)
        if known is not None:  # a peer status knows under another name: use what it knows
            found = match(status, label, f"{name} -> {', '.join(tailnet)}",
                          query=next(ip for ip in known.ips if ip in tailnet))
            if found is not None:
                return found
        else:
            # The status lists every node this one can reach: an address none of them has
            # is nobody's here (a typo, a removed machine), not a server without a token.
            address = name.strip("[]")
            if address in tailnet:  # an IP literal: any "did you mean" is about it alone
                msg = f"no node of this tailnet has the address {address}"
                head = str(hint) if hint else msg
            else:
                msg = f"{name!r} is {', '.join(tailnet)}, which no node of this tailnet has"
                head = f"{hint}; and {msg}" if hint else msg
            note(Step(label, False, msg))
            raise PeerNotFound(_explain(head, steps))
    short = name.strip().rstrip(".").split(".")[0] if not is_tailnet_ip(name) else name
    dns = name.strip().rstrip(".") if "." in name and not is_tailnet_ip(name) else ""
    node = ServerNode(short_name=short, dns_name=dns, ips=tuple(tailnet))
    note(Step(label, True, f"{name} -> {', '.join(tailnet)} (a tailnet address)"))
    return Found(node=node, ip=_pick_ip(tailnet), tun=None if status is None else status.tun,
                 socket=status_socket, via=label)


# DNS's limits (RFC 1035): a whole name, and one label of it.
MAX_NAME, MAX_LABEL = 253, 63


def check_name(name: str) -> None:
    """InvalidInput unless ``name`` could name a server: not empty, and within DNS's limits
    (an IP literal always can)."""
    host = name.strip().rstrip(".").strip("[]")
    if not host:
        raise InvalidInput("no server given: name it by its MagicDNS name (chat-server), full "
                           "name or tailnet IP")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return
    shown = host if len(host) <= 40 else host[:40] + "…"
    if len(host) > MAX_NAME or any(len(label) > MAX_LABEL for label in host.split(".")):
        raise InvalidInput(f"{shown!r} is not a server name: a name is at most {MAX_NAME} "
                           f"characters, each part between dots at most {MAX_LABEL}")
    if any(c.isspace() or not c.isprintable() or c in "/@:" for c in host):
        base, colon, port = host.rpartition(":")
        # ("chat-server:50621" was refused without a word about the port: a daily user's
        # day, 2026-11-25)
        hint = (f"; a port goes in --port (or TSNETCHAT_PORT): {base} --port {port}"
                if colon and base and port.isdigit() and ":" not in base else "")
        raise InvalidInput(f"{shown!r} is not a server name: give its MagicDNS name "
                           f"(chat-server), full name or tailnet IP{hint}")


def _explain(head: str, steps: Sequence[Step]) -> str:
    tried = "\n".join(f"  {s.name}: {s.detail}" for s in steps)
    return f"{head}\ntried, in order:\n{tried}"


# --- proxies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    kind: str  # "http" or "socks5"
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"


def parse_proxy(value: str, where: str = "--proxy") -> Proxy:
    """``host:port`` (HTTP), ``http://host:port``, ``socks5://host:port`` (or socks5h)."""
    scheme, sep, rest = value.strip().partition("://")
    if not sep:
        scheme, rest = "http", value.strip()
    kind = {"http": "http", "socks5": "socks5", "socks5h": "socks5"}.get(scheme.lower())
    host, _, port = rest.rstrip("/").rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address: [::1]:1080
        host = host[1:-1] if _is_ipv6(host[1:-1]) else ""
    elif not (host.isascii() and host.replace(".", "").replace("-", "").replace("_", "").isalnum()):
        host = ""  # ("[::1", "user@h", "a b", "h/x": nothing to connect to)
    if kind is None or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {value!r} is not a proxy address like "
                          "socks5://127.0.0.1:1055 or http://127.0.0.1:1055 (IPv6 in "
                          "brackets: [::1]:1055)")
    return Proxy(kind, host, int(port))


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


class ProxyRefused(Exception):
    """Internal: the proxy answered, but did not connect (its words attached)."""


Handshake = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _proxied(proxy: Proxy, handshake: Handshake, timeout: float
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to ``proxy`` and ask it for a stream (``handshake``); the
    connection is closed unless the proxy agreed."""
    r, w = await asyncio.wait_for(asyncio.open_connection(proxy.host, proxy.port), timeout)
    try:
        await asyncio.wait_for(handshake(r, w), timeout)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        w.close()
        raise ProxyRefused("it closed the connection") from None
    except BaseException:
        w.close()
        raise
    return r, w


async def socks5_connect(proxy: Proxy, ip: str, port: int, timeout: float = PROBE_TIMEOUT
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP stream to ``ip:port`` through a SOCKS5 proxy (RFC 1928, no authentication)."""
    async def handshake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"\x05\x01\x00")
        if await r.readexactly(2) != b"\x05\x00":
            raise ProxyRefused("it wants a username and password, or is not a SOCKS5 proxy")
        addr = ipaddress.ip_address(ip)
        atyp = b"\x01" if addr.version == 4 else b"\x04"
        w.write(b"\x05\x01\x00" + atyp + addr.packed + port.to_bytes(2, "big"))
        head = await r.readexactly(4)
        bound = {1: 4, 4: 16}.get(head[3])
        if bound is None:  # a name: one length byte first
            bound = (await r.readexactly(1))[0]
        await r.readexactly(bound + 2)
        if head[1] != 0:
            words = {1: "general failure", 2: "not allowed", 3: "network unreachable",
                     4: "host unreachable", 5: "connection refused", 6: "TTL expired"}
            raise ProxyRefused(f"SOCKS5 reply: {words.get(head[1], f'code {head[1]}')}")

    return await _proxied(proxy, handshake, timeout)


async def http_connect(proxy: Proxy, ip: str, port: int, timeout: float = PROBE_TIMEOUT
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP stream to ``ip:port`` through an HTTP CONNECT proxy."""
    hostport = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    async def handshake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(f"CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode())
        status = (await r.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0].decode(errors="replace")
        if status.split(" ")[1:2] != ["200"]:
            raise ProxyRefused(status)

    return await _proxied(proxy, handshake, timeout)


# --- routes -------------------------------------------------------------------------------


def no_way_to_dial(name: str, why: str) -> TailnetError:
    return TailnetError(
        f"this machine's tailscaled runs in userspace-networking mode: programs reach the "
        f"tailnet only through its proxy, and no proxy is configured{why}. Two ways to reach "
        f"{name}:\n"
        "  1. give tailscaled a proxy and tell tsnetchat: start tailscaled with "
        "--socks5-server=localhost:1055 (or --outbound-http-proxy-listen=localhost:1055), "
        "then `export TSNETCHAT_PROXY=socks5://localhost:1055` (or pass --proxy);\n"
        "  2. run tailscaled with a TUN device (kernel networking, its default when it runs "
        "as root), and tsnetchat dials directly.")


async def route(found: Found, port: int, *, proxy: str = "",
                report: Report | None = None) -> Target:
    """Choose how to reach ``found`` and try it once. Raises TailnetError (cannot reach the
    node, or no way to dial from here) or ServerUnavailable (nothing listens on ``port``)."""
    node = found.node
    base = Target(name=node.short_name, host=node.dns_name or found.ip, ip=found.ip, port=port,
                  mode="direct", node=node)
    if proxy:
        p = parse_proxy(proxy, "--proxy/TSNETCHAT_PROXY")
        target = replace(base, mode="proxy" if p.kind == "http" else "socks5", proxy=p.url)
        how = f"through the {p.kind.upper()} proxy {p.host}:{p.port}"
    elif found.tun is False:
        if not found.socket:
            raise no_way_to_dial(node.short_name, "")
        target = replace(base, mode="localapi", socket=found.socket)
        how = "through tailscaled's LocalAPI dial"
    else:
        target = base
        how = ("directly (this node has a TUN device)" if found.tun else
               "directly (MagicDNS resolved it, so this machine routes the tailnet)")
    await probe(target)
    if report is not None:
        report(Step("dial", True, f"{found.ip}:{port} {how}"))
    return target


async def _open(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One raw stream to the target, the way its mode says."""
    if target.mode == "localapi":
        api = LocalAPI(target.socket, timeout=PROBE_TIMEOUT)
        try:
            return await api.dial(target.ip, target.port)
        finally:
            await api.aclose()
    if target.mode in ("proxy", "socks5"):
        p = parse_proxy(target.proxy)
        connect = http_connect if p.kind == "http" else socks5_connect
        return await connect(p, target.ip, target.port)
    return await asyncio.wait_for(asyncio.open_connection(target.ip, target.port),
                                  PROBE_TIMEOUT)


async def probe(target: Target) -> None:
    """Open and close one connection, turning failures into plain errors."""
    where = f"{target.name} ({target.ip})"
    online = target.node.online if target.node else None
    proxied = target.mode in ("proxy", "socks5")
    try:
        _, w = await _open(target)
    except ProxyRefused as e:
        if online:  # the proxy says only "could not connect" (HTTP 500, SOCKS5 failure)
            raise not_serving(target) from None
        raise TailnetError(f"the proxy could not reach {where} port {target.port} ({e}); is "
                           "its machine online, and the server running?") from None
    except TailnetError as e:
        if target.mode == "localapi" and " 403 " in str(e):
            raise no_way_to_dial(target.name, " (and this tailscaled refuses LocalAPI dial to "
                                 "this user)") from None
        if target.mode == "localapi" and "refused" in str(e):  # 502: the peer sent a reset
            raise not_serving(target) from None
        raise
    except (TimeoutError, OSError) as e:
        raise _unreachable(target, where, e, proxied) from None
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()


def not_serving(target: Target) -> ServerUnavailable:
    """The server's machine is on the tailnet, but nothing serves tsnetchat on the port."""
    return ServerUnavailable(f"{target.name} is on the tailnet but nothing answers on port "
                             f"{target.port}: is `tsnetchat serve` running there?")


def _words(e: OSError) -> str:
    # asyncio's connect errors carry their own text as strerror; the errno says it plainly
    return os.strerror(e.errno) if e.errno else str(e)


def _unreachable(target: Target, where: str, e: OSError | TimeoutError,
                 proxied: bool) -> TailnetError | ServerUnavailable:
    if proxied:
        if isinstance(e, TimeoutError):
            return TailnetError(f"the proxy {target.proxy} did not connect to {where} in "
                                f"{PROBE_TIMEOUT:.0f}s; is its machine online?")
        return TailnetError(f"the proxy {target.proxy} does not answer ({_words(e)}); is "
                            "tailscaled running with that proxy (--socks5-server or "
                            "--outbound-http-proxy-listen)?")
    if isinstance(e, ConnectionRefusedError):
        return not_serving(target)
    if isinstance(e, TimeoutError) or e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                                  errno.ETIMEDOUT):
        return TailnetError(f"{where} does not answer on the tailnet: its machine is offline "
                            "or asleep, or this machine's tailscaled is not up")
    return TailnetError(f"cannot reach {where}: {_words(e)}")


# --- the gRPC channel ---------------------------------------------------------------------


CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    # One Connection, one TCP connection: grpc's Python client otherwise shares a connection
    # between all channels to the same target (its global subchannel pool), so a "new"
    # connection could silently be an old one, with the old one's server-side identity.
    ("grpc.use_local_subchannel_pool", 1),
    # A server (or its node) that vanished without closing shows only as an unanswered
    # HTTP/2 PING: detected within 15 s, then the session reconnects. The server accepts a
    # ping every 5 s without data (server.GRPC_OPTIONS); without max_pings_without_data = 0
    # core stops after two pings on a quiet stream, and since grpc core's PR 34647 the
    # answer is awaited for grpc.http2.ping_timeout_ms (default 60 s), not the keepalive one.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class DialBridge:
    """A private socket; each connection to it is carried to the server by ``opener``
    (LocalAPI dial, or a SOCKS5 proxy). gRPC cannot use a custom dialer from Python, so we
    give it a socket it can dial: a unix socket in a private dir, or on Windows (no unix
    sockets in asyncio) a loopback port."""

    def __init__(self, opener: Opener) -> None:
        self.opener = opener
        self._dir = tempfile.mkdtemp(prefix="tsnetchat-")
        self.path = os.path.join(self._dir, "dial.sock")
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        if sys.platform == "win32":
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        os.chmod(self.path, 0o600)
        return f"unix:{self.path}"

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(w)
        try:
            upstream = await self.opener()
        except (OSError, TimeoutError, TailnetError, ProxyRefused):
            w.close()
            return
        finally:
            if task is not None:
                task.add_done_callback(self._handlers.discard)
        self._writers.add(upstream[1])
        await splice((r, w), upstream)
        self._writers.difference_update((w, upstream[1]))

    async def close(self) -> None:
        """Stop accepting, end every carried connection, and wait for their handlers, so
        none is left to be cancelled when the event loop ends."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


async def open_channel(target: Target) -> tuple[grpc.aio.Channel, DialBridge | None]:
    opts = list(CHANNEL_OPTIONS)
    hostport = f"[{target.ip}]:{target.port}" if ":" in target.ip else f"{target.ip}:{target.port}"
    if target.mode == "proxy":
        opts += [("grpc.http_proxy", target.proxy), ("grpc.enable_http_proxy", 1)]
        return grpc.aio.insecure_channel(hostport, options=opts), None
    if target.mode in ("localapi", "socks5"):
        bridge = DialBridge(lambda: _open(target))
        addr = await bridge.start()
        opts += [("grpc.default_authority", f"{target.host}:{target.port}"),
                 ("grpc.enable_http_proxy", 0)]
        return grpc.aio.insecure_channel(addr, options=opts), bridge
    opts.append(("grpc.enable_http_proxy", 0))
    return grpc.aio.insecure_channel(hostport, options=opts), None
