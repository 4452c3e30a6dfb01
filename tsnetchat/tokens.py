"""The client's tokens: where they come from, where they are kept, how they stay fresh.

Sources, first match wins: ``--token``, ``--token-file``, ``TSNETCHAT_TOKEN``
(``explicit_token``), then the token store. The store is read only after discovery has found
the server, so a typo gets "did you mean" before any question about tokens.

The store (``~/.config/tsnetchat/tokens.json``, mode 0600) keys each token by the server's
node, not by the name typed: its stable node id when discovery knows it (LocalAPI or the
tailscale command), else its tailnet addresses (what the resolver gives). The short name,
the full MagicDNS name and the tailnet IP all find the same token, and a renamed server
keeps it. A file written by an older tsnetchat (``{name: token}``) is read as tokens for
those exact names.

Tokens from ``tsnetchat login`` (``login``) renew themselves while they are used: a
connection made past half a token's life renews it first (``Renewal.ready``), and
connections that stay open get it renewed in the background, their metadata updated. A
renewal the server refuses is kept in the store with the server's words and said plainly:
a revoked token stops at once; a token whose grant went away works until it expires. A
refusal that ended the token is believed for ``DEAD_FOR``; after that the token is tried
again, renewal first, and the server decides (one that ran for a while with another key
refused every token it had issued; a review, 2026-11-24). Admin-issued tokens are used as
they are and never renewed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import random
import stat
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import grpc

from . import discovery
from .clienterrors import translate
from .errors import (
    ConfigError,
    InvalidInput,
    PeerNotFound,
    TailnetError,
    TsnetchatError,
    Unauthenticated,
)
from .pb import chat_pb2 as pb
from .pb import chat_pb2_grpc as pb_grpc
from .resume import START_GRACE, StreamState

log = logging.getLogger("tsnetchat.tokens")

STORE_VERSION = 2
RENEW_AT = 0.5  # share of a login token's life after which the client renews it
# How long a renewal refusal that ended a token is believed before the token is tried again
# (each try is one refused renewal while it stays refused). A waiting chat tries it again
# after 10 s, doubling (resume.SAME_TOKEN_FIRST): within a few minutes of the server's return.
DEAD_FOR = 60.0
RPC_TIMEOUT = 15.0


def store_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tsnetchat" / "tokens.json"


# No token is longer (a server refuses longer ones, auth.MAX_TOKEN_BYTES; gRPC refuses
# metadata past 16 KiB with words meant for nobody).
MAX_TOKEN_CHARS = 4096


def explicit_token(token: str | None = None, token_file: Path | None = None) -> str | None:
    """The token a person gave for this command: flag, file, or TSNETCHAT_TOKEN; else None.

    Raises InvalidInput (exit 2) when what was given cannot be used as a token, whatever the
    cause: a file that cannot be read, empty, not text, absurdly long; said here, not by the
    server. (A missing file was ConfigError, exit 3, and an empty one exit 2: a script
    could not tell "no token given" by one code.)"""
    if token:
        return check_token(token.strip(), "--token")
    if token_file is not None:
        where = f"token file {token_file}"
        try:
            with token_file.open("rb") as f:
                raw = f.read(MAX_TOKEN_CHARS * 4 + 1)  # never the whole of a huge file
        except OSError as e:
            raise InvalidInput(f"--token-file {token_file}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{where} does not hold a token: it is not text") from None
        if not text.strip():
            raise InvalidInput(f"{where} is empty")
        return check_token(text.strip(), where)
    env = os.environ.get("TSNETCHAT_TOKEN", "").strip()
    return check_token(env, "TSNETCHAT_TOKEN") if env else None


def check_token(token: str, where: str) -> str:
    """``token``, or InvalidInput naming ``where`` it came from when it cannot be one: a
    token is one word of printable ASCII, at most MAX_TOKEN_CHARS long."""
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidInput(f"{where} does not hold a token: it is longer than "
                           f"{MAX_TOKEN_CHARS} characters, which no token is")
    bad = next((c for c in token if not "!" <= c <= "~"), None)
    if bad is not None:
        raise InvalidInput(f"{where} does not hold a token: it contains "
                           f"{'a space' if bad.isspace() else f'U+{ord(bad):04X}'} (a token is "
                           "one word of printable ASCII)")
    return token


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def refused_renewal(server: str, words: str) -> Unauthenticated:
    """A renewal the server refused for good (revoked, another key): what to do now, said
    once (the server's words name `tsnetchat login` for a token that came from it)."""
    advice = ("" if "tsnetchat login" in words else
              f". Run `tsnetchat login {server}` to ask for a new one")
    return Unauthenticated(f"{server} refused to renew your token: {words}{advice}")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# An Entry field's type (as written in the class) -> its test, and its name in words.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                  "a list of strings"),
}


@dataclass
class Entry:
    """One stored token and the server node it belongs to."""

    node_id: str  # the server's stable node id; "" when unknown
    name: str  # the server's MagicDNS name (or the name typed), for people
    ips: list[str]
    token: str = field(repr=False)
    token_id: str = ""
    source: str = "admin"  # "login": renewed while used; "admin": used as it is
    received: float = 0.0  # this machine's clock when the token arrived (login tokens)
    lifetime: float = 0.0  # seconds it was issued for; 0 = unknown
    refused: str = ""  # the server's words when it refused a renewal
    dead: bool = False  # the refusal also ended the token (revoked)
    refused_at: float = 0.0  # this machine's clock then (0: not known, by an older tsnetchat)
    # The server's port: two servers on one node (a team's and a test one) each keep their
    # own token. 0: any port (an entry an older tsnetchat wrote, or a caller that does not
    # say; one server's token was used for, and replaced by, the other's before).
    port: int = 0

    @property
    def expires(self) -> float | None:
        return self.received + self.lifetime if self.lifetime else None

    def renew_at(self) -> float:
        return self.received + self.lifetime * RENEW_AT

    def renewable(self) -> bool:
        return self.source == "login" and self.lifetime > 0 and not self.refused

    def expired(self, now: float) -> bool:
        exp = self.expires
        return exp is not None and now >= exp

    def matches(self, node: discovery.ServerNode, port: int = 0) -> bool:
        if port and self.port and port != self.port:
            return False
        if node.node_id and self.node_id:
            return node.node_id == self.node_id
        return bool(set(node.ips) & set(self.ips))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        """Raises TypeError naming a field that is missing or not of its type (one of the
        wrong type was read, and a later use of it ended in a TypeError: "a bug")."""
        names = {f.name for f in fields(cls)}
        for f in fields(cls):
            ok, what = _KINDS[str(f.type)]
            if f.name in d and not ok(d[f.name]):
                raise TypeError(f"{f.name} is not {what}")
        return cls(**{k: v for k, v in d.items() if k in names})


class TokenStore:
    """The token file. Every call reads it afresh: another tsnetchat may have renewed."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or store_path()

    def read(self) -> tuple[list[Entry], dict[str, str]]:
        """Entries, and tokens an older version saved by name. Raises ConfigError, in
        words, for a file this version cannot read (a directory, not JSON, a newer version's
        format): nothing here ever writes over such a file (``put`` reads first)."""
        try:
            st = self.path.stat()
        except (FileNotFoundError, NotADirectoryError):  # nothing kept there (yet)
            return [], {}
        except OSError as e:
            raise ConfigError(f"cannot read {self.path}: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{self.path} should be the file that keeps your tokens, but it "
                              "is a directory or another kind of file: move it away")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            # ("holds tokens" was said of a damaged file too: a newcomer, 2026-11-24)
            raise ConfigError(f"{self.path} is where your tokens are kept, and others can "
                              f"read it (mode {mode:04o}); run `chmod 600 {self.path}`")
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path} is not a token file tsnetchat wrote (it is not "
                              "text): move it away") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{self.path} is not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read {self.path}: {e.strerror or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path} is not a token file tsnetchat wrote (not a JSON "
                              "object): move it away")
        version = data.get("version")
        if version is None:  # version 1: {name: token}
            return [], {_norm(k): v for k, v in data.items() if isinstance(v, str)}
        if version != STORE_VERSION:
            newer = isinstance(version, int) and version > STORE_VERSION
            raise ConfigError(
                f"{self.path} is in a format this tsnetchat does not know (version "
                f"{str(version)[:20]}; it reads version {STORE_VERSION})"
                + (", written by a newer tsnetchat: use that one" if newer else "")
                + ". Not reading or changing it")
        servers, names = data.get("servers", []), data.get("names") or {}
        if not isinstance(servers, list) or not all(isinstance(e, dict) for e in servers) \
                or not isinstance(names, dict):
            raise ConfigError(f"{self.path} is damaged (its servers or names are not what "
                              "tsnetchat writes): move it away, then log in again")
        try:
            entries = [Entry.from_json(e) for e in servers]
        except TypeError as e:
            raise ConfigError(f"{self.path} has an entry tsnetchat cannot read ({e})") from None
        return entries, {str(k): str(v) for k, v in names.items()}

    def write(self, entries: list[Entry], names: dict[str, str]) -> Path:
        """Replace the file (atomically, mode 0600). Raises ConfigError naming the file when
        it cannot be written."""
        data = {"version": STORE_VERSION, "servers": [asdict(e) for e in entries],
                "names": names}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
            os.chmod(tmp, 0o600)
            tmp.replace(self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            where = e.filename if e.filename and str(e.filename) != str(tmp) else self.path
            raise self._cannot_save(f"{where}: {e.strerror or e}") from None
        return self.path

    def check_writable(self) -> None:
        """ConfigError, naming the file, unless ``put`` could keep a token: the file is one
        this version reads, and its directory can be made and written."""
        self.read()
        d = self.path.parent
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise self._cannot_save(f"{e.filename or d}: {e.strerror or e}") from None
        if not os.access(d, os.W_OK | os.X_OK):
            raise self._cannot_save(f"{d} is not writable")

    def _cannot_save(self, why: str) -> ConfigError:
        return ConfigError(f"cannot save tokens in {self.path}: {why} (set XDG_CONFIG_HOME to "
                           "a directory you can write)")

    def find(self, node: discovery.ServerNode, typed: str, port: int = 0) -> Entry | None:
        """The token kept for the server on ``node`` at ``port`` (0: at any port), one kept
        for that very port first."""
        entries, names = self.read()
        mine = [e for e in reversed(entries) if e.matches(node, port)]
        found = next((e for e in mine if e.port == port), mine[0] if mine else None)
        if found is not None:
            return found
        for name in (typed, node.dns_name, node.short_name):
            if name and _norm(name) in names:
                return Entry(node_id="", name=name, ips=[], token=names[_norm(name)])
        return None

    def put(self, entry: Entry) -> Path:
        """Keep ``entry``, replacing what was stored for the same server: its node and port
        (and what was kept for that node at no port in particular)."""
        entries, names = self.read()
        node = discovery.ServerNode(short_name="", dns_name="", ips=tuple(entry.ips),
                                    node_id=entry.node_id)
        kept = [e for e in entries if not (e.matches(node) and e.port in (0, entry.port))]
        return self.write([*kept, entry], names)


def _unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, without checking it (only to show and schedule; the server
    checks). {} when it is not a JWT."""
    try:
        part = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return data if isinstance(data, dict) else {}


def outlived(token: str, now: float) -> bool:
    """Whether ``token`` says it expired before ``now`` (read without checking it: a token
    past its own end can never work again, whoever signed it)."""
    exp = _unverified_claims(token).get("exp")
    return isinstance(exp, int) and now >= exp


def save_admin_token(node: discovery.ServerNode, token: str,
                     store: TokenStore | None = None, port: int = 0) -> Path:
    """Keep a token an admin issued, for the server at ``port`` on this node
    (``--save-token`` of `connect` and `whoami`)."""
    claims = _unverified_claims(token)
    iat, exp = claims.get("iat"), claims.get("exp")
    timed = isinstance(iat, int) and isinstance(exp, int) and exp > iat
    entry = Entry(node_id=node.node_id, name=node.dns_name or node.short_name,
                  ips=list(node.ips), token=token, token_id=str(claims.get("jti", "")),
                  source="admin", received=float(iat) if timed else 0.0,  # type: ignore[arg-type]
                  lifetime=float(exp - iat) if timed else 0.0,  # type: ignore[operator]
                  port=port)
    return (store or TokenStore()).put(entry)


# --- renewal ------------------------------------------------------------------------------


class Conn(Protocol):
    """What renewal needs of a client connection (client.Connection)."""

    stub: Any
    metadata: Any  # replaced with the renewed token's
    channel: grpc.aio.Channel


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _is_open(conn: Conn) -> bool:
    try:
        state = conn.channel.get_state(try_to_connect=False)
    except Exception:  # a closed grpc.aio channel may raise instead of answering
        return False
    return bool(state != grpc.ChannelConnectivity.SHUTDOWN)


class Renewal:
    """Keeps one stored login token fresh for this process's connections to its server."""

    _live: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                               dict[tuple[str, str], Renewal]]] = (
        weakref.WeakKeyDictionary())

    def __init__(self, store: TokenStore, entry: Entry, typed: str) -> None:
        self.store, self.entry, self.typed = store, entry, typed
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._next = 0.0

    @classmethod
    def for_server(cls, node: discovery.ServerNode, typed: str,
                   store: TokenStore | None = None, port: int = 0) -> Renewal:
        """The stored token for the server at ``port`` on ``node`` (``TokenStore.find``);
        raises Unauthenticated, in words, when there is none or it can no longer be used."""
        store = store or TokenStore()
        entry = store.find(node, typed, port)
        now = time.time()
        if entry is None and node.this_machine:
            raise PeerNotFound(
                f"{typed} is this machine ({node.dns_name or node.short_name}), not a "
                "tsnetchat server you have a token for: give the server's name (a bot on the "
                "server's own machine passes its token with --token)")
        elsewhere = store.find(node, typed) if entry is None and port else None
        if elsewhere is not None and elsewhere.port:
            # (a server on another port than 50051, logged in to with its --port: every
            # command without it said "no token: run tsnetchat login", which asks 50051; a
            # newcomer, 2026-11-25)
            raise Unauthenticated(
                f"no token for {typed} at port {port}; the token kept for {typed} is for port "
                f"{elsewhere.port}: pass `--port {elsewhere.port}` (or set "
                f"TSNETCHAT_PORT={elsewhere.port}), or, if the server now listens on "
                f"{port}, `tsnetchat login {typed} --port {port}`")
        if entry is None:
            raise Unauthenticated(
                f"no token for {typed}: run `tsnetchat login {typed}` (if that server hands "
                "out tokens), or pass the token its admin gave you with --token or "
                f"--token-file (`tsnetchat whoami {typed} --token-file FILE --save-token` "
                "checks it and keeps it)")
        exp = entry.expires
        if exp is not None and entry.expired(now):
            why = f", and {typed} had refused to renew it: {entry.refused}" if entry.refused \
                else ""
            again = f"`tsnetchat login {typed}`" if entry.source == "login" else \
                "a new token from its admin"
            raise Unauthenticated(f"your token for {typed} expired on {_when(exp)}{why}. "
                                  f"Get a new one: {again}")
        loop = asyncio.get_running_loop()
        live = cls._live.setdefault(loop, {})
        key = (str(store.path),
               f"{entry.node_id or ','.join(sorted(entry.ips)) or entry.name}:{entry.port}")
        r = live.get(key)
        if r is not None and r.entry.token_id != entry.token_id:
            r = None  # (another token since: a login)
        # The latest refusal: the store's, or this process's own (kept only here when the
        # store could not be written).
        last = r.entry if r is not None and r.entry.refused_at > entry.refused_at else entry
        if last.dead and now - last.refused_at < DEAD_FOR:
            raise refused_renewal(typed, last.refused)
        if last.dead:  # tried again: renewed first, and the server decides
            entry = replace(entry, refused="", dead=False)
        if r is None:
            r = live[key] = cls(store, entry, typed)
        elif entry.received > r.entry.received or (r.entry.dead and not entry.dead):
            r.entry = entry  # renewed by another process meanwhile, or tried again
        return r

    @property
    def token(self) -> str:
        return self.entry.token

    async def ready(self, conn: Conn) -> None:
        """Renew now if the token is past ``RENEW_AT`` of its life, and keep it fresh for
        ``conn`` while it stays open. Raises Unauthenticated when the renewal is refused
        because the token itself is no longer valid (revoked)."""
        self._conns.add(conn)
        if self.entry.renewable() and time.time() >= max(self.entry.renew_at(), self._next):
            await self.renew(conn)
        self._schedule()

    async def renew(self, conn: Conn) -> None:
        """One renewal over ``conn``. A transient failure is retried later (background);
        refusals are stored and said."""
        try:
            res = await conn.stub.RenewToken(pb.RenewTokenRequest(),
                                             metadata=bearer(self.entry.token),
                                             timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            self._failed(e)
            return
        self.entry = replace(self.entry, token=res.token, token_id=res.token_id,
                             received=time.time(),
                             lifetime=float(res.expires_unix - res.issued_unix), refused="")
        self._keep()
        for c in list(self._conns):
            c.metadata = bearer(res.token)
        log.debug("renewed token %s for %s", res.token_id, self.typed)

    def _keep(self) -> None:
        """Store the entry; one that cannot be stored still serves this process."""
        try:
            self.store.put(self.entry)
        except ConfigError as e:
            log.warning("the renewed token for %s is used but not kept: %s", self.typed, e)

    def _failed(self, e: grpc.aio.AioRpcError) -> None:
        code, words = e.code(), e.details() or e.code().name
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNIMPLEMENTED):
            dead = code == grpc.StatusCode.UNAUTHENTICATED
            self.entry = replace(self.entry, refused=words, dead=dead, refused_at=time.time())
            self._keep()
            if dead:
                raise refused_renewal(self.typed, words)
            exp = self.entry.expires or time.time()
            log.warning("%s will not renew your token: %s. It works until %s at the latest",
                        self.typed, words, _when(exp))
            return
        # Busy, too early, or unreachable: try again, well before it expires.
        left = (self.entry.expires or time.time()) - time.time()
        self._next = time.time() + min(30.0, max(1.0, left / 4))
        log.debug("renewal of the token for %s failed (%s); retrying", self.typed, code.name)

    def _schedule(self) -> None:
        if self._timer is not None or self._task is not None or not self.entry.renewable():
            return
        delay = max(1.0, max(self.entry.renew_at(), self._next) - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        live = [c for c in list(self._conns) if _is_open(c)]
        if live:
            self._task = asyncio.ensure_future(self._background(live[0]))

    async def _background(self, conn: Conn) -> None:
        try:
            await self.renew(conn)
        except TsnetchatError as e:  # refused: stored; the server also closes its streams
            log.warning("%s", e)
            return
        finally:
            self._task = None
        self._schedule()


# --- login --------------------------------------------------------------------------------


async def _ask(target: discovery.Target) -> pb.LoginResponse:
    """One Login call to ``target``, on a connection of its own."""
    channel, bridge = await discovery.open_channel(target)
    try:
        stub: Any = pb_grpc.ChatStub(channel)  # type: ignore[no-untyped-call]
        res: pb.LoginResponse = await stub.Login(pb.LoginRequest(), timeout=RPC_TIMEOUT)
        return res
    finally:
        await channel.close()
        if bridge is not None:
            await bridge.close()


def _check_server(found: discovery.ServerNode, claimed: pb.ServerNode, ip: str) -> None:
    """The server's word about its node must agree with what this side knows: tailscale's
    stable id when discovery had it, else the address that was dialled."""
    if found.node_id and claimed.node_id and found.node_id != claimed.node_id:
        raise TailnetError(f"the server at {ip} says it is node {claimed.node_id}, but "
                           f"tailscale says that is node {found.node_id}; not keeping its "
                           "token")
    if not found.node_id and claimed.addresses and ip not in claimed.addresses:
        raise TailnetError(f"the server at {ip} gives other addresses for itself "
                           f"({', '.join(claimed.addresses)}); not keeping its token")


async def login(name: str, *, socket: str = "", port: int, proxy: str = "",
                report: discovery.Report | None = None, store: TokenStore | None = None,
                warn: Callable[[str], None] | None = None) -> tuple[Entry, pb.LoginResponse]:
    """Ask the server ``name`` for a token of one's own and keep it. Discovery first (a typo
    gets "did you mean"); gRPC refusals propagate as AioRpcError with the server's words. A
    failure on the way to the server is tried again, on a new connection, within
    ``resume.START_GRACE`` (each attempt said on ``warn``), as ``first_answer`` does for
    other commands: a login typed as the server started failed at once, "nothing answers",
    where `connect` and `whoami` waited for it (an operator's run, 2026-11-25)."""
    store = store or TokenStore()
    found = await discovery.discover(name, socket=socket, report=report)
    store.check_writable()  # before the server issues a token that could not be kept
    state = StreamState(grace=START_GRACE)
    while True:
        state.connecting()
        try:
            target = await discovery.route(found, port, proxy=proxy, report=report)
            res = await _ask(target)
            break
        except Exception as e:
            err = translate(e, server=found.node.dns_name or name)
            # (Only when the call cannot have reached the server: a refusal is its answer,
            # and one that timed out may have been given a token.)
            delay = state.lost(err, time.monotonic(), random.random()) if (
                err.status in (None, grpc.StatusCode.UNAVAILABLE)) else None
            if delay is None:
                raise
        report = None  # (the steps are said once)
        if warn is not None:
            warn(f"cannot reach {found.node.dns_name or name} yet: trying again ({err})")
        await asyncio.sleep(delay)
    _check_server(found.node, res.server, target.ip)
    ips = list(dict.fromkeys([*found.node.ips, *res.server.addresses]))
    entry = Entry(node_id=found.node.node_id or res.server.node_id,
                  name=res.server.name or found.node.dns_name or name, ips=ips,
                  token=res.token, token_id=res.token_id, source="login",
                  received=time.time(), lifetime=float(res.expires_unix - res.issued_unix),
                  port=port)
    try:
        store.put(entry)
    except ConfigError as e:
        raise ConfigError(f"{entry.name} issued you a token (id {entry.token_id}), but it "
                          f"could not be kept: {e}") from None
    return entry, res
