"""`tsnetchat doctor`: a checklist, one verdict per line, in plain words.

On a server (``checks``): tailscaled, login, addresses, MagicDNS, listening, key file, store
(writable, free space, its write lock); without sudo the last three say they need it.
On a client (``client_checks``, ``doctor --server NAME``): each discovery step, how the
server is dialled, the token, and whether the server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import stat
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import DEFAULT_PORT, ServerConfig
from .discovery import Step
from .errors import ConfigError, TsnetchatError
from .statedir import LOCK_NAME, check_own_files, read_key, running_server
from .store import LIVE_TOKENS, WAL_SIZE_LIMIT
from .tailnet import LocalAPI, Status

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"

# Free space under the state dir below which the history store check warns, and fails. (A
# full disk was "all good" while every send was refused; an operator's run, 2026-11-23.)
CHECK_FOR = 10.0  # seconds SQLite's quick_check may take before doctor stops it
LOW_DISK = 256 * 2**20
FULL_DISK = 16 * 2**20
WAL_HELD = 2 * WAL_SIZE_LIMIT  # twice what a checkpoint that caught up leaves


@dataclass
class Check:
    name: str
    verdict: str
    detail: str

    def line(self) -> str:
        mark = {OK: "✔", WARN: "!", FAIL: "✘", SKIP: "-"}[self.verdict]
        return f"{mark} {self.name:24} {self.detail}"


async def _port_open(host: str, port: int) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


async def _cluster(cfg: ServerConfig, wait: float = 5.0) -> Check:
    """Cluster mode: whether the NATS cluster answers and its stream has a leader and every
    copy. (With two of three nodes down every send was refused as not confirmed, and doctor
    did not look: an operator's run, 2026-11-24.)"""
    import nats
    import nats.errors
    import nats.js.errors

    from .cluster import SOURCE, STREAM, connect_options

    try:
        opts = connect_options(cfg)
    except ConfigError as e:
        return Check("cluster", FAIL, str(e))

    async def quiet(e: Exception) -> None:  # (nats-py prints tracebacks without one)
        pass

    # Read before the stream is asked: a running server applies what comes meanwhile, and
    # a copy read after the answer was ahead of it on a busy cluster (a false FAIL).
    applied = _applied(cfg.db_path, SOURCE)
    nc = None
    try:
        nc = await asyncio.wait_for(nats.connect(
            **opts, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
            error_cb=quiet), wait)
        info = await nc.jetstream(timeout=wait).stream_info(STREAM)
    except nats.js.errors.NotFoundError:
        return Check("cluster", WARN, "NATS answers, but there is no TSNETCHAT stream yet (the "
                     "first server to start makes it)")
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
            nats.js.errors.ServiceUnavailableError):
        # (10008 "JetStream system temporarily unavailable" with 2 of 3 nodes down was said
        # in nats-py's words; a cluster engineer's run, 2026-11-25)
        return Check("cluster", FAIL, f"the NATS cluster at {cfg.cluster} did not answer "
                     f"within {wait:g} s: is it up, and does it have a quorum (most of its "
                     "nodes)? Without one every send is refused as not confirmed")
    except (nats.errors.Error, OSError) as e:
        if "authorization violation" in str(e).lower():  # (nats-py: a plain Error)
            # (said as "nats: 'Authorization Violation'" alone: an operator's run, 2026-11-25)
            return Check("cluster", FAIL, f"the NATS cluster at {cfg.cluster} refused this "
                         "server's credentials: check nats_user and its password "
                         "(nats_password, nats_credentials or the `nats` systemd credential)")
        return Check("cluster", FAIL, f"cannot use the NATS cluster at {cfg.cluster}: {e}")
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
    if info.state.last_seq < applied:  # (as `serve` refuses to start: cluster.py)
        return Check("cluster", FAIL, f"this server's copy ({cfg.db_path}) has applied the "
                     f"stream up to sequence {applied}, but the cluster's ends at "
                     f"{info.state.last_seq}: it was deleted and made again, or this is "
                     "another NATS cluster; the server will not start on it (README, "
                     "Troubleshooting)")
    group = info.cluster
    if group is None or not group.leader:
        return Check("cluster", FAIL, "the TSNETCHAT stream has no leader (fewer than a quorum "
                     "of NATS nodes): every send is refused as not confirmed")
    behind = sorted(str(r.name) for r in group.replicas or [] if r.offline or not r.current)
    copies = 1 + len(group.replicas or [])
    current, quorum = copies - len(behind), copies // 2 + 1
    gone = f"offline or behind: {', '.join(behind)}; {current} of {copies} copies current"
    if current < quorum:
        # (the leader goes on naming itself for a while after the others are gone, and
        # doctor said "no problems" while every send was refused; a kill -9 run, 2026-11-24)
        return Check("cluster", FAIL, f"the stream's leader is {group.leader}; {gone}, and a "
                     f"quorum needs {quorum}: every send is refused as not confirmed")
    if behind:
        more = current - quorum + 1
        return Check("cluster", WARN, f"the stream's leader is {group.leader}; {gone}: "
                     f"{more} more lost and sends stop")
    return Check("cluster", OK, f"the stream's leader is {group.leader}; {copies} copies current")


def _applied(db_path: Path, source: str) -> int:
    """How far this server's copy has applied the cluster's stream (0 when it cannot say)."""
    row = _first_row(db_path, "SELECT seq FROM applied WHERE source=?", (source,))
    return int(row[0]) if row else 0


def _first_row(db_path: Path, sql: str, params: tuple[object, ...] = ()) -> Any:
    """The first row ``sql`` gives in the database at ``db_path``, or None when it cannot
    say (no database, files that are not this user's, an SQLite error). ``mode=rw``, not
    ``ro``, as ``_damaged``: a read-only connection leaves a stopped server's -wal and -shm
    behind."""
    if not db_path.is_file():
        return None
    try:  # (as root, SQLite would take a hard-linked -wal for its own)
        check_own_files(db_path.parent, (db_path,))
    except ConfigError:
        return None
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=rw", uri=True, timeout=1)
        try:
            return db.execute(sql, params).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None


async def _no_answer(host: str, port: int, wait: float = 3.0) -> str | None:
    """Why the server at ``host``:``port`` does not answer gRPC's health check within
    ``wait`` seconds (it needs no token), or None when it says it serves. (A hung server
    still completes TCP connections from the kernel's backlog, and doctor said it answered:
    an operator's run, 2026-11-23.)"""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with grpc.aio.insecure_channel(  # (a proxy in the environment is not the server)
            target, options=[("grpc.use_local_subchannel_pool", 1),
                             ("grpc.enable_http_proxy", 0)]) as channel:
        try:
            res = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=wait)
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name} after {wait:.0f} s" if (
                e.code() is grpc.StatusCode.DEADLINE_EXCEEDED) else f"{e.code().name}"
    if res.status != health_pb2.HealthCheckResponse.SERVING:
        return f"its health is {health_pb2.HealthCheckResponse.ServingStatus.Name(res.status)}"
    return None


def _shut_out(cfg: ServerConfig) -> str | None:
    """Why this user may not look inside the state dir (the server's alone, 0700), or None.
    (Without sudo, doctor stopped at the key file with "permission denied" and printed none
    of its checks: an operator's run, 2026-11-23.)"""
    try:
        os.listdir(cfg.state_dir)
    except PermissionError:
        return (f"not checked: {cfg.state_dir} is readable only by the server's user; run "
                "`sudo tsnetchat doctor`")
    except OSError:
        pass
    return None


async def checks(cfg: ServerConfig, *, with_api: bool = False) -> list[Check]:
    out: list[Check] = []
    shut = _shut_out(cfg)
    sock = cfg.effective_socket()
    st: Status | None = None
    if shut and Path(sock).is_relative_to(cfg.state_dir):
        # (the embedded unit's socket, which only its user reaches: "not answering (Connect
        # Error). Is tailscaled running?" of a running one; an operator's run, 2026-11-25)
        out.append(Check("tailscaled reachable", WARN, f"{shut} (the embedded tailscaled's "
                         "socket is in it)"))
    else:
        api = LocalAPI(sock, timeout=3)
        try:
            st = await api.status()
            out.append(Check("tailscaled reachable", OK, f"LocalAPI answers at {sock}"))
        except TsnetchatError as e:
            out.append(Check("tailscaled reachable", FAIL, f"{e}{_embedded_hint(cfg)}"))
        finally:
            await api.aclose()

    if st is None:
        for name in ("logged in", "tailnet addresses", "MagicDNS name", "listening"):
            out.append(Check(name, SKIP, "needs tailscaled"))
    else:
        if st.running:
            out.append(Check("logged in", OK, f"Running as {st.self_node.login or '?'}"))
        else:
            out.append(Check("logged in", FAIL, f"tailscaled is {st.backend_state}: run "
                             "`tailscale up` (or give the embedded node an auth key)"))
        if st.ips:
            mode = "TUN" if st.tun else "userspace networking"
            out.append(Check("tailnet addresses", OK, f"{', '.join(st.ips)} ({mode})"))
        else:
            out.append(Check("tailnet addresses", FAIL, "this node has no tailnet address yet"))
        if st.dns_name and st.magic_dns_enabled:
            # (without the port of a server on another one, that command asked 50051; a
            # newcomer, 2026-11-25)
            port = f" --port {cfg.port}" if cfg.port != DEFAULT_PORT else ""
            out.append(Check("MagicDNS name", OK, f"{st.dns_name} (clients: tsnetchat connect "
                             f"{st.self_node.short_name}{port})"))
        elif st.dns_name:
            out.append(Check("MagicDNS name", WARN, f"{st.dns_name}, but MagicDNS is off on this "
                             "tailnet: clients must use the tailnet IP"))
        else:
            out.append(Check("MagicDNS name", FAIL, "no MagicDNS name (is the node logged in?)"))
        if st.ips:
            from .server import listen_addresses

            addrs = listen_addresses(st) if cfg.listen == "auto" else cfg.listen.split(",")
            up = [a for a in addrs if await _port_open(a.strip(), cfg.port)]
            where = ", ".join(f"{a}:{cfg.port}" for a in addrs)
            if len(up) < len(addrs):
                out.append(Check("listening", FAIL, f"nothing listens on {where}: is `tsnetchat "
                                 "serve` running (systemctl status tsnetchat)?"))
            elif shut:
                out.append(Check("listening", WARN, f"something answers on {where}; whether "
                                 f"it is this state dir's server is {shut}"))
            elif running_server(cfg.state_dir) is None:
                # (another program holding the port answered "all good" while `serve` had
                # exited with "cannot listen": an operator's run, 2026-11-23)
                out.append(Check("listening", FAIL, f"something answers on {where}, but no "
                                 f"tsnetchat server is running on {cfg.state_dir}: another "
                                 f"program holds the port (`ss -ltnp 'sport = :{cfg.port}'` "
                                 "names it), or the server uses another state dir"))
            else:
                hung = await _no_answer(addrs[0].strip(), cfg.port)
                out.append(Check("listening", FAIL, f"the server on {where} takes connections "
                                 f"but does not answer ({hung}): it may be hung; `journalctl "
                                 "-u tsnetchat` says more, `systemctl restart tsnetchat` "
                                 "restarts it") if hung else
                           Check("listening", OK, f"a server answers on {where}"))

    in_the_way = _in_the_way(cfg.state_dir)
    if in_the_way:
        out.append(Check("key file", SKIP, "needs the state dir"))
        out.append(Check("history store", FAIL, in_the_way))
    else:
        out.append(Check("key file", WARN, shut) if shut else _key_file(cfg))
        out.append(Check("history store", WARN, shut) if shut else _history_store(cfg))
    if cfg.cluster:
        out.append(await _cluster(cfg))

    if with_api:
        from .apidoctor import api_checks

        out.extend(await api_checks(cfg, st))
    return out


# --- on a client ------------------------------------------------------------------------


def _embedded_hint(cfg: ServerConfig) -> str:
    """A hint, when the system tailscaled was checked but the state dir holds an embedded
    one's socket (its unit runs `serve --embedded`, a flag the config does not hold: doctor
    said the system tailscaled was not running, and every check after it was skipped; an
    operator's run in the systemd container, 2026-11-25)."""
    if cfg.embedded or cfg.socket:
        return ""
    try:
        if not os.path.lexists(cfg.embedded_dir / "tailscaled.sock"):
            return ""
    except OSError:
        return ""
    return (" (the state dir has an embedded tailscaled's socket: for a server run with "
            "--embedded, as tsnetchat-embedded.service is, `tsnetchat doctor --embedded`)")


def _from_step(step: Step) -> Check:
    return Check(step.name, {True: OK, False: FAIL, None: SKIP}[step.ok], step.detail)


async def client_checks(server: str, *, port: int, token: str | None, socket: str = "",
                        proxy: str = "") -> list[Check]:
    """How this machine finds and reaches ``server``; ``token`` None = the stored one."""
    from .discovery import discover, route
    from .tokens import Renewal, TokenStore

    steps: list[Step] = []
    try:
        found = await discover(server, socket=socket, report=steps.append)
    except TsnetchatError as e:
        return [*map(_from_step, steps),
                Check("server found", FAIL, str(e).split("\ntried, in order:")[0])]
    # A step that failed before a later one found the server is worth knowing, not a problem.
    out = [replace(c, verdict=WARN) if c.verdict == FAIL else c for c in map(_from_step, steps)]
    try:
        await route(found, port, proxy=proxy, report=lambda s: out.append(_from_step(s)))
    except TsnetchatError as e:
        out.append(Check("dial", FAIL, str(e)))
        return out
    if token is None:
        try:
            stored = TokenStore().find(found.node, server, port)
            renewal = Renewal.for_server(found.node, server, port=port)
        except TsnetchatError as e:
            out.append(Check("token", FAIL, str(e)))
            return out
        entry = renewal.entry
        left = f", expires {time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.expires))}" \
            if entry.expires else ""
        how = "from `tsnetchat login`, renewed while used" if entry.source == "login" else \
            "issued by an admin"
        warn = f"; the server refused to renew it: {entry.refused}" if entry.refused else ""
        if stored is not None and stored.dead and not entry.dead:  # (tried again: tokens)
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stored.refused_at))
            warn = (f"; the server refused to renew it ({when}): {stored.refused}; asked "
                    "again below")
        out.append(Check("token", WARN if warn else OK, f"stored for {entry.name} ({how}{left})"
                                                         f"{warn}"))
    else:
        out.append(Check("token", OK, "given on the command line or in TSNETCHAT_TOKEN"))
    out.extend(await _reach(server, port, token, socket, proxy))
    return out


async def _reach(server: str, port: int, token: str | None, socket: str, proxy: str
                 ) -> list[Check]:
    import grpc

    from .client import connect

    try:
        conn = await connect(server, token, socket=socket, port=port, proxy=proxy)
    except TsnetchatError as e:
        return [Check("server reachable", FAIL, str(e))]
    try:
        me = await conn.whoami(timeout=5)
        return [Check("server reachable", OK, f"{server} answers; you are {me.identity.login} "
                      f"(rooms: {', '.join(me.rooms)})")]
    except grpc.aio.AioRpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # (a warning: "no problems", exit 0, for a token every command refuses; an
            # operator's run, 2026-11-23)
            return [Check("server reachable", OK, f"{server} answers"),
                    Check("let in", FAIL, f"{server} refuses you: {e.details()}")]
        return [Check("server reachable", FAIL, f"{server} does not answer ({code.name}: "
                      f"{e.details()})")]
    finally:
        await conn.close()


def _print(results: list[Check]) -> bool:
    for c in results:
        print(c.line())
    bad = [c for c in results if c.verdict == FAIL]
    warned = sum(c.verdict == WARN for c in results)
    print("\n" + (f"{len(bad)} problem(s) found" if bad else
                  f"no problems; {warned} warning(s) (!) above" if warned else "all good"))
    return not bad


async def run_client_doctor(server: str, *, port: int, token: str | None, socket: str = "",
                            proxy: str = "") -> bool:
    return _print(await client_checks(server, port=port, token=token, socket=socket,
                                      proxy=proxy))


async def run_doctor(cfg: ServerConfig, *, with_api: bool = False) -> bool:
    return _print(await checks(cfg, with_api=with_api))


def _in_the_way(state_dir: Path) -> str:
    """What `serve` says when ``state_dir`` cannot be a directory (a file of its name or on
    its path); "" when it can. (The doctor said "sd/jwt.key/jwt.key does not exist yet" and
    "Not a directory; check ownership" of `--state-dir sd/jwt.key`: an operator's run,
    2026-11-25.)"""
    for p in (state_dir, *state_dir.parents):
        if os.path.lexists(p):
            try:
                if p.is_dir():
                    return ""
            except PermissionError:  # (the units' state dir is a link into /var/lib/private,
                return ""            # which only root may enter: ``_shut_out`` says so)
            return (f"the state dir {state_dir} is not a directory (a file of that name, or "
                    "on its path, is in the way): give --state-dir a directory")
    return ""


def _history_store(cfg: ServerConfig) -> Check:
    """Whether the state dir can hold the history. A doctor only looks: a state dir that
    does not exist yet is not made (the server makes it when it first starts)."""
    if not cfg.state_dir.exists():
        parent = next((p for p in cfg.state_dir.parents if p.exists()), Path("/"))
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return Check("history store", WARN, f"{cfg.state_dir} does not exist yet; "
                         "`tsnetchat serve` makes it when it first starts (is --state-dir or "
                         "the config file the server's?)")
        return Check("history store", FAIL, f"cannot write in {cfg.state_dir}: it does not "
                     f"exist and {parent} is not writable; check ownership (StateDirectory= "
                     "under systemd)")
    try:
        with tempfile.NamedTemporaryFile(dir=cfg.state_dir, prefix=".doctor-"):
            pass
        if cfg.db_path.exists() and not os.access(cfg.db_path, os.W_OK):
            raise PermissionError(f"{cfg.db_path} is not writable")
        vfs = os.statvfs(cfg.state_dir)
        free = vfs.f_bavail * vfs.f_frsize
        if free < LOW_DISK:
            return Check("history store", FAIL if free < FULL_DISK else WARN,
                         f"{cfg.state_dir} is writable, but its disk has {free / 2**20:.0f} MB "
                         "free: messages are refused when it is full (the WAL alone may grow "
                         "to 64 MB); free some space")
        try:  # (before SQLite opens any of them by name: a hard-linked -wal was said fine)
            check_own_files(cfg.state_dir, (cfg.db_path,))
        except ConfigError as e:
            return Check("history store", FAIL, str(e))
        in_the_way = _lock_in_the_way(cfg.state_dir)
        if in_the_way:
            return Check("history store", FAIL, in_the_way)
        stuck = _wal_held(cfg)  # (before anything here opens the database)
        held = _write_lock_held(cfg.db_path) or _damaged(cfg.db_path, cfg.state_dir)
        if held:
            return Check("history store", FAIL, held)
        behind = stuck or _not_restarted(cfg)
        if behind:
            return Check("history store", WARN, behind)
        return Check("history store", OK, f"{cfg.state_dir} is writable, "
                     f"{free / 2**30:.1f} GB free")
    except OSError as e:
        # (a file system gone read-only was told to check ownership: an operator's run,
        # 2026-11-25)
        fix = (f"its file system is mounted read-only (`findmnt -T {cfg.state_dir}`; a disk "
               "error can do that: `dmesg`)" if e.errno == errno.EROFS else
               "check ownership (StateDirectory= under systemd)")
        return Check("history store", FAIL, f"cannot write in {cfg.state_dir}: "
                     f"{e.strerror or e}; {fix}")


def _lock_in_the_way(state_dir: Path) -> str | None:
    """Why the server cannot take the state dir's lock file (statedir.StateLock), else None.
    (A directory, a FIFO or a link there stopped `serve` and `restore`, and doctor said all
    was well: an operator's run, 2026-11-25.)"""
    lock = state_dir / LOCK_NAME
    try:
        st = os.lstat(lock)
    except FileNotFoundError:
        return None
    what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
            "a directory" if stat.S_ISDIR(st.st_mode) else
            "not a regular file" if not stat.S_ISREG(st.st_mode) else
            f"a file with {st.st_nlink - 1} other name(s) (a hard link)" if st.st_nlink != 1
            else "")
    if not what:
        return None
    return (f"the lock file {lock} is {what}: the server will not start, nor `restore` run, "
            "until it is removed (the server makes it again; nothing else is in it)")


def _key_file(cfg: ServerConfig) -> Check:
    """The signing key: there, not a link, private, long enough; missing while tokens signed
    with it are still on record is a failure."""
    key = cfg.key_path
    if not os.path.lexists(key):
        # (not in cluster mode, where the key comes from the cluster, as the server's warning)
        lost = 0 if cfg.cluster else _live_tokens(cfg.db_path)
        if lost:
            return Check("key file", FAIL, f"{key} is missing, but {lost} unexpired token(s) "
                         "were issued with it: the next start makes a new key and every one "
                         "of them stops working. Put the key back if it was lost by mistake; "
                         "else issue them again (tsnetchat token list)")
        return Check("key file", WARN, f"{key} does not exist yet (created on first start)")
    try:
        read_key(key)
    except ConfigError as e:  # (the server's own check, and its words)
        return Check("key file", FAIL, f"{str(e).rstrip('.')}. The server refuses to start "
                     "with it, or keeps the key it had")
    except FileNotFoundError:  # (a race: it was there a moment ago)
        return Check("key file", WARN, f"{key} does not exist yet (created on first start)")
    except OSError as e:  # (the dir may be listed, the key read only by the server's user)
        return Check("key file", WARN, f"not checked: cannot read {key} ({e.strerror or e}); "
                     "run `sudo tsnetchat doctor`")
    mode = stat.S_IMODE(key.lstat().st_mode)
    if not mode & 0o400:  # (root reads it anyway: ✔ for a key the service's user cannot
        # read; an operator's run, 2026-11-24)
        return Check("key file", FAIL, f"{key} mode {mode:04o}: its owner cannot read it (the "
                     f"units run the server as its own user, which would refuse to start); "
                     f"chmod 600 {key}")
    return Check("key file", OK, f"{key} mode {mode:04o}")


def _live_tokens(db_path: Path) -> int:
    """Tokens on record in the database that are neither revoked nor expired (0 when it
    cannot say)."""
    row = _first_row(db_path, LIVE_TOKENS, (int(time.time()),))
    return int(row[0]) if row else 0


def _damaged(db_path: Path, state_dir: Path) -> str | None:
    """Why the database cannot be trusted (SQLite's quick_check, which writes nothing),
    else None. (A database with damaged pages passed every check: an operator's run,
    2026-11-23.) ``mode=rw``, not ``ro``: a read-only connection leaves the -wal and -shm
    files of a stopped server's database behind."""
    from .store import SCHEMA_VERSION, quick_check

    if not os.path.lexists(db_path):
        return None
    if db_path.is_symlink():
        return (f"{db_path} is a symbolic link; the state dir holds only the server's own "
                "files: remove it and restore the last backup")
    if db_path.stat().st_size == 0:  # (`serve` refuses it; doctor said nothing)
        return (f"{db_path} is empty (0 bytes): it was truncated or replaced, and the server "
                f"will not start on it; restore the last backup (`sudo tsnetchat restore "
                f"--state-dir {state_dir} BACKUP`)")
    checked = quick_check(db_path, CHECK_FOR)  # (not judged when it could not finish)
    if checked is None:
        return None
    version, found = checked
    if found == ["ok"] and version > SCHEMA_VERSION:
        return (f"{db_path} was written by a newer tsnetchat (schema version {version}; this "
                f"one understands up to {SCHEMA_VERSION}): the server will not start on it; "
                "install the newer tsnetchat again, or restore a backup taken before it")
    if found == ["ok"]:
        return None
    return (f"{db_path} is damaged (SQLite's quick_check: {'; '.join(found[:3])}): stop the "
            f"server and restore the last backup (`sudo tsnetchat restore --state-dir "
            f"{state_dir} BACKUP`)")


def _wal_held(cfg: ServerConfig) -> str | None:
    """Why the running server's WAL keeps growing, when it is over WAL_HELD: a checkpoint
    that catches up cuts it back to store.WAL_SIZE_LIMIT (64 MB), and one never catches up
    past a read transaction another process keeps open. (A `tsnetchat backup` stopped
    mid-copy grew it to 297 MB in 30 s of a steady load while doctor said all good: an
    operator's run, 2026-11-25.)"""
    wal = cfg.db_path.with_name(cfg.db_path.name + "-wal")
    try:
        size = wal.lstat().st_size
    except OSError:
        return None
    if size <= WAL_HELD or running_server(cfg.state_dir) is None:
        return None
    return (f"{wal} is {size / 2**20:.0f} MB and grows with every message until the disk is "
            "full: another process keeps an old read transaction open on the database (a "
            "`tsnetchat backup` that hangs or was stopped, a `sqlite3` shell), so the server "
            f"cannot move the WAL into the database. `fuser -v {cfg.db_path}` names it; end "
            "it")


def _not_restarted(cfg: ServerConfig) -> str | None:
    """Why the upgrade is not done, when the server running on the state dir is older than
    this tsnetchat (its database's schema is), else None. (Between the install and the
    restart of README, Operations, step 9, doctor said "all good": an operator's run,
    2026-11-25.)"""
    from .store import SCHEMA_VERSION

    if running_server(cfg.state_dir) is None:
        return None
    row = _first_row(cfg.db_path, "PRAGMA user_version")
    if row is None:
        return None
    version = int(row[0])
    if version >= SCHEMA_VERSION:
        return None
    return (f"the server running on {cfg.state_dir} is older than this tsnetchat (its "
            f"database has schema version {version}, this one {SCHEMA_VERSION}): restart it "
            "to finish the upgrade, after a backup (README, Operations, step 9)")


def _write_lock_held(db_path: Path, wait: float = 1.0) -> str | None:
    """Why nothing can be stored now, if another process has held the database's write lock
    for ``wait`` (a server holds it a few milliseconds a commit), else None. Takes the lock
    and gives it back at once, writing nothing; ``mode=rw`` never makes a database. (With
    the lock held by a `sqlite3` shell, every send was refused and doctor said "all good":
    an operator's run, 2026-11-23.)"""
    if not db_path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=rw", uri=True, timeout=wait,
                             isolation_level=None)
    except sqlite3.Error:
        return None  # (not ours to judge here: the server says what is wrong when it opens)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    except sqlite3.DatabaseError as e:  # (not a database at all: ``_damaged`` says so)
        if "locked" not in str(e) and "busy" not in str(e):
            return None
        return (f"another process has held {db_path}'s write lock for over {wait:.0f} s: "
                "every send is refused until it lets go (`fuser -v "
                f"{db_path}` names it; a `sqlite3` shell in a transaction is the usual one)")
    finally:
        db.close()
    return None
