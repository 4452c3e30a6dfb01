"""The `tsnetchat` command. Parses options and calls one function per command. The one loop
here is `tail`'s: it follows a room across reconnects (a feed, not a chat session).

Exit codes (for scripts): 0 ok, 1 error, 2 usage, 3 configuration (also a state dir that
holds no history or no key: the wrong --state-dir or config), 4 tailnet (tailscaled not
running, no such peer), 5 unauthenticated, 6 permission denied, 7 server unavailable,
8 history database or backup file (a database there but empty, not tsnetchat's, from a newer
tsnetchat, damaged, the disk full; a backup file missing, or one of those, or where `backup`
may not write), 9 the state dir is in use (`restore` under a running server).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

# gRPC's C core logs to stderr, which would scribble over the chat screen; our own messages
# say what went wrong. Must be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
import typer
from typer.core import TyperGroup

from . import __version__
from .commands import room_option
from .config import CLUSTER_DB, DEFAULT_PORT, ServerConfig, for_operator, load_config
from .errors import (
    ConfigError,
    InvalidInput,
    PermissionDenied,
    ServerUnavailable,
    StateDirInUse,
    StoreError,
    TailnetError,
    TsnetchatError,
    Unauthenticated,
)
from .loop import new_event_loop


class _Commands(TyperGroup):
    """A command group's help lists each command with its whole first paragraph, wrapped
    (click cut each to one line ending in "...": `send  Send one message and print its
    id...` at 60 columns), and the group named alone prints its help on stdout, as
    `--help` does (click prints it on stderr, so `tsnetchat | less` showed nothing)."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [(name, " ".join((cmd.short_help or cmd.help or "").split("\n\n")[0].split()))
                for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            typer.echo(ctx.get_help())
            ctx.exit(2)
        return super().parse_args(ctx, args)


def _typer(help: str, **kw: Any) -> typer.Typer:
    """A command group in plain text: a bad option is one line under the usage, as every
    other error is, and help wraps to the terminal (up to 120 columns) without cutting a
    word. (Rich drew errors in a box and cut `--proxy`'s socks5://127.0.0.1:1055 to
    "socks5://127.0.0.1…" at 80 columns: a new user's day, 2026-11-24.)"""
    return typer.Typer(no_args_is_help=True, help=help, rich_markup_mode=None, cls=_Commands,
                       context_settings={"max_content_width": 120}, **kw)


app = _typer("A private chat service on your Tailscale tailnet.", add_completion=False)
token_app = _typer("Issue, list and revoke access tokens.")
config_app = _typer("Inspect the effective configuration.")
app.add_typer(token_app, name="token")
app.add_typer(config_app, name="config")
grants_app = _typer("Show and edit tsnetchat's grants in the tailnet policy file (Tailscale's "
                    "API).")
app.add_typer(grants_app, name="grants")

EXIT = {ConfigError: 3, TailnetError: 4, Unauthenticated: 5, PermissionDenied: 6,
        ServerUnavailable: 7, InvalidInput: 2, StateDirInUse: 9, StoreError: 8}


def fail(e: BaseException) -> typer.Exit:
    from .clienterrors import ClientError, translate

    if isinstance(e, grpc.aio.AioRpcError):  # (`login`: the client's one boundary says it)
        e = translate(e)
    if isinstance(e, ClientError):
        typer.secho(f"error: {e}", err=True, fg="red")
        return typer.Exit(e.exit_code)
    code = next((c for t, c in EXIT.items() if isinstance(e, t)), 1)
    typer.secho(f"error: {e}", err=True, fg="red")
    return typer.Exit(code)


# Said when a command that changes something is stopped (Ctrl-C) before its answer: it
# exited 130 without a word (a daily user's day, 2026-11-25).
MAYBE_DONE = ("stopped before the server answered: it may have been done; look (history) "
              "before you do it again")


def run(coro: Any, *, changes: bool = False) -> Any:
    """Run a command's coroutine; its errors as the command line says them. ``changes``: it
    changes something, and being stopped says that it may have been done."""
    try:
        # The server's loop must be one whose load the hub can read (tsnetchat.loop).
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(coro)
    except (TsnetchatError, grpc.aio.AioRpcError) as e:
        raise fail(e) from None
    except KeyboardInterrupt:
        if changes:
            typer.secho(MAYBE_DONE, err=True, fg="yellow")
        raise typer.Exit(130) from None


def setup_logging(level: str) -> None:
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    prio = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    class Fmt(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = f"{record.levelname.lower()} {record.name}: {record.getMessage()}"
            if record.exc_info:
                msg += " " + self.formatException(record.exc_info).replace("\n", " | ")
            if journald:  # journald reads the <N> priority prefix
                return f"<{prio.get(record.levelname, 6)}>{msg}"
            return f"{self.formatTime(record, '%H:%M:%S')} {msg}"

    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(Fmt())
    logging.basicConfig(level=level.upper(), handlers=[h], force=True)
    # httpx logs every LocalAPI request at info; that is noise in a daemon's journal.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


# Options shared by server-side commands. None = not given on the command line.
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file "
                                                "(default /etc/tsnetchat/config.toml if present)")]
StateOpt = Annotated[Path | None, typer.Option(
    help="State directory (history, key).", readable=False)]  # (ours says "try sudo")
SocketOpt = Annotated[str | None, typer.Option(help="tailscaled LocalAPI socket.")]


def _need_server(instead: str = "") -> None:
    """The server's commands need the `server` extra; a client-only install says so (and
    ``instead``, what the client may have meant)."""
    import importlib

    for module in ("jwt", "grpc_health.v1", "grpc_reflection.v1alpha"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise fail(ConfigError(
                f"this command runs the server side, which needs more than the client: "
                f"pip install '/path/to/tsnetchat[server]' (your checkout, or the wheel; README, "
                f"Install; missing: {module.split('.')[0]})"
                f"{instead}")) from None


def _server_config(config: Path | None, **flags: Any) -> ServerConfig:
    try:
        return load_config(file=config, flags=flags)
    except ConfigError as e:
        raise fail(e) from None


def _operator_config(config: Path | None, **flags: Any) -> ServerConfig:
    """The config of a command that works on a server's state (config.for_operator)."""
    return for_operator(_server_config(config, **flags))


@app.command()
def serve(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    socket: SocketOpt = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 50051).")] = None,
    listen: Annotated[str | None, typer.Option(
        help="'auto' (ask tailscaled) or a comma-separated list of IPs.")] = None,
    embedded: Annotated[bool | None, typer.Option(
        "--embedded/--system-tailscaled",
        help="Run a private userspace tailscaled instead of using the system one.")] = None,
    hostname: Annotated[str | None, typer.Option(help="Embedded node hostname.")] = None,
    login_server: Annotated[str | None, typer.Option(help="Control server URL (embedded).")] = None,
    auth_key_file: Annotated[str | None, typer.Option(help="Auth key file (embedded).")] = None,
    tailscaled_path: Annotated[str | None, typer.Option(
        help="tailscaled binary (embedded).")] = None,
    require_grant: Annotated[bool | None, typer.Option(
        "--require-grant/--no-require-grant", help="Refuse users without an app grant.")] = None,
    cap_domain: Annotated[str | None, typer.Option(help="Grant capability domain.")] = None,
    enroll: Annotated[str | None, typer.Option(
        help="Self-service tokens (tsnetchat login): off, grant or any.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus text endpoint port.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    cluster: Annotated[str | None, typer.Option(
        help="Cluster mode: the NATS JetStream cluster's URLs (nats://h1:4222,nats://h2:4222)."
    )] = None,
) -> None:
    """Run the chat server on this node's tailnet addresses."""
    flags = dict(state_dir=state_dir, socket=socket, port=port, listen=listen, embedded=embedded,
                 hostname=hostname, login_server=login_server, auth_key_file=auth_key_file,
                 tailscaled_path=tailscaled_path, require_grant=require_grant,
                 cap_domain=cap_domain, enroll=enroll, metrics_port=metrics_port,
                 log_level=log_level, cluster=cluster)
    _need_server()
    cfg = _server_config(config, **flags)
    setup_logging(cfg.log_level)
    from .daemon import run_daemon

    raise typer.Exit(run(run_daemon(cfg, lambda: load_config(file=config, flags=flags))))


# --- tokens --------------------------------------------------------------------------


def _store(cfg: ServerConfig) -> Any:
    """The history/token database, its state dir made private first (statedir.py)."""
    from .statedir import running_server, secure_state_dir
    from .store import Store

    try:
        secure_state_dir(cfg.state_dir, (cfg.db_path,))
        # (a server still running may be the version before an upgrade: it alone upgrades)
        return Store(cfg.db_path, upgrade=running_server(cfg.state_dir) is None)
    except TsnetchatError as e:
        raise fail(e) from None


def _cluster_unsaid(cfg: ServerConfig) -> bool:
    """Whether ``cfg`` names a cluster server's state dir (cluster.db, no tsnetchat.db)
    without the cluster settings."""
    return not cfg.cluster and not cfg.db_path.is_file() and (
        cfg.state_dir / CLUSTER_DB).is_file()


def _cluster_blind(cfg: ServerConfig) -> None:
    """ConfigError (exit 3) when ``_cluster_unsaid``: token list said there was no history
    (an attacker's run over the lab, 2026-11-25); token issue made a tsnetchat.db the server
    never reads, and backup said there was no history (an operator's run, 2026-11-25)."""
    if _cluster_unsaid(cfg):
        raise fail(ConfigError(
            f"{cfg.state_dir} is a cluster server's (cluster.db): give this command the "
            "server's cluster settings too (--config with its config file, or "
            "TSNETCHAT_CLUSTER)"))


def _existing_store(cfg: ServerConfig) -> Any:
    """The database of a state dir a server has used; never a new one made for a mistyped
    ``--state-dir`` (an admin command that finds nothing there must say so, not succeed on
    an empty database)."""
    from .backup import no_history

    _cluster_blind(cfg)
    try:
        why = no_history(cfg.db_path)
    except ConfigError as e:
        raise fail(e) from None
    if why:
        raise fail(ConfigError(why))
    return _store(cfg)


# The longest --ttl: ten years. (A mistyped 99999999999d signed a token until the year
# 273,792,727.)
MAX_TTL_SECONDS = 3650 * 86400


def _parse_ttl(ttl: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        seconds = (float(ttl[:-1]) * units[ttl[-1]] if ttl[-1] in units else float(ttl))
    except (ValueError, IndexError):
        raise fail(InvalidInput(f"--ttl: {ttl!r} is not a duration like 12h, 30d")) from None
    if not 0 < seconds <= MAX_TTL_SECONDS:  # (NaN fails this too)
        raise fail(InvalidInput(f"--ttl: {ttl!r} is not a lifetime between 1s and 3650d"))
    return seconds


@token_app.command("issue")
def token_issue(
    subject: Annotated[str, typer.Argument(help="Tailnet login (alice@example.com) or tag:x.")],
    room: Annotated[list[str] | None, typer.Option(
        help="Allowed room (repeat); default all.")] = None,
    admin: Annotated[bool, typer.Option(help="May kick and revoke.")] = False,
    ttl: Annotated[str | None, typer.Option(
        help="Lifetime, e.g. 12h, 30d (default: token_ttl_hours, 30 days).")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Sign a token for a tailnet user. It only works from that user's own devices."""
    _need_server()
    from . import auth
    from .config import TAG_RE
    from .rooms import is_login

    if not (is_login(subject) or (TAG_RE.fullmatch(subject)
                                  and len(subject) <= auth.MAX_LOGIN)):
        raise fail(InvalidInput(f"{subject[:80]!r} is not a tailnet login (alice@example.com) "
                                f"or a tag (tag:bot) of at most {auth.MAX_LOGIN} characters; "
                                "no token was issued"))
    for r in room or []:  # (before anything is created: a typo must leave nothing behind)
        if not auth.is_token_room(r):
            raise fail(InvalidInput(f"--room: {r[:80]!r} is not a valid room name (a-z, 0-9, "
                                    "_ and -, at most 32); no token was issued"))
    ttl_seconds = _parse_ttl(ttl) if ttl is not None else None  # (--ttl "" is no lifetime)
    cfg = _operator_config(config, state_dir=state_dir)
    seconds = cfg.token_ttl_hours * 3600 if ttl_seconds is None else ttl_seconds
    _cluster_blind(cfg)
    new_key = not cfg.key_path.exists()
    store = _store(cfg)
    try:
        # Logins must match WhoIs's exactly: a token for ALICE@Example.com is refused on
        # every device of alice@example.com (an operator's run, 2026-11-23).
        # Either way round (GitHub logins keep their capitals); a login seen sending is as
        # the tailnet spells it, one known only from a token may itself be mistyped.
        capitals = subject != subject.lower() and not subject.startswith("tag:")
        people = store.people()
        twins = [k for k in people if k != subject and k.lower() == subject.lower()
                 and (people[k] or capitals)]
        if twins:
            raise InvalidInput(f"{subject!r} is {twins[0]!r} with other capitals; a token works "
                               "only for the login exactly as the tailnet spells it (`tailscale "
                               "status` shows it); no token was issued")
        if capitals:
            typer.secho(f"note: {subject} has capitals; a token works only for the login "
                        "exactly as the tailnet spells it (`tailscale status` shows it)",
                        err=True)
        key = auth.load_or_create_key(cfg.key_path)
        if new_key:  # (a mistyped --state-dir would otherwise sign with a key nobody checks)
            typer.secho(f"made a new signing key at {cfg.key_path}: no server had used "
                        f"{cfg.state_dir} yet; its `tsnetchat serve` must use the same "
                        "state dir", err=True)
        tok, claims = auth.issue_token(key, subject, room or [], admin=admin,
                                       ttl_seconds=seconds)
        store.record_token(claims.to_row())
    except TsnetchatError as e:
        raise fail(e) from None
    finally:
        store.close()
    if json_out:
        typer.echo(json.dumps({"token": tok, "id": claims.token_id, "subject": subject,
                               "rooms": sorted(claims.rooms), "admin": admin,
                               "expires": claims.expires_at}))
    else:
        typer.echo(tok)
        typer.secho(f"token id {claims.token_id} for {subject}, rooms "
                    f"{','.join(sorted(claims.rooms))}{', admin' if admin else ''}", err=True)


@token_app.command("list")
def token_list(config: ConfigOpt = None, state_dir: StateOpt = None,
               json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List issued tokens (ids, subjects, rooms, expiry, revocation)."""
    cfg = _operator_config(config, state_dir=state_dir)
    store = _existing_store(cfg)
    try:
        rows = store.list_tokens()
    except TsnetchatError as e:  # (a locked database, a damaged one)
        raise fail(e) from None
    finally:
        store.close()
    # The key file is written only when the key changes (`rotate-key`, a cluster's new key),
    # so a token issued before that second was signed with a key no server takes any more
    # (after `rotate-key` every old token was listed "active"). Two blind spots: a token
    # issued in the second of a rotation is listed "active", and a key copied without its
    # time (`cp`, not `cp -a`) makes older ones "old-key" (the README says so).
    try:
        key_since = int(cfg.key_path.stat().st_mtime)
    except OSError:
        key_since = 0

    def state(r: Any) -> str:  # a store.TokenRecord
        if r.revoked_at:
            return "revoked"
        if r.exp < time.time():
            return "expired"
        return "old-key" if r.iat < key_since else "active"

    states = [state(r) for r in rows]
    if json_out:
        typer.echo(json.dumps([{**r.__dict__, "state": st} for r, st in zip(rows, states,
                                                                          strict=True)]))
        return
    for r, st in zip(rows, states, strict=True):
        typer.echo(f"{r.jti}  {r.sub:30} rooms={r.rooms:20} admin={int(r.admin)} "
                   f"expires={time.strftime('%Y-%m-%d', time.gmtime(r.exp))} {st}")
    if "old-key" in states:
        typer.echo("(old-key: signed before the signing key was last rotated; refused)")


@token_app.command("revoke")
def token_revoke(token_id: str, config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Revoke a token; a running server closes its streams within a second."""
    cfg = _operator_config(config, state_dir=state_dir)
    token_id = token_id.strip()
    if not token_id:
        raise fail(InvalidInput("give the id of the token to revoke (`tsnetchat token list` "
                                "shows them)"))
    store = _existing_store(cfg)
    try:
        # Every token a lone server signed is recorded here (issued, enrolled or renewed); a
        # cluster's are recorded where they were signed, so there an unknown id is revoked.
        known = store.knows_token(token_id)
        if not known and not cfg.cluster:
            raise fail(InvalidInput(
                f"no token with id {token_id!r} was issued here (`tsnetchat token list` shows "
                "the ids, in full); nothing was revoked"))
        new = store.revoke(token_id)
    except TsnetchatError as e:  # (a locked database, a full disk): nothing was revoked
        raise fail(e) from None
    finally:
        store.close()
    typer.echo(f"revoked {token_id}" if new else f"{token_id} was already revoked")
    if not known:
        typer.secho(f"({token_id} was not issued by this server; the cluster's servers refuse "
                    "it all the same)", err=True)


@token_app.command("rotate-key")
def token_rotate_key(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Replace the signing key: every token issued so far stops working (a running server
    closes their streams within a second). Issue new tokens afterwards. In cluster mode, run
    it where a server of the cluster runs: that server makes the new key every server's."""
    from . import auth
    from .statedir import running_server

    cfg = _operator_config(config, state_dir=state_dir)
    _cluster_blind(cfg)
    if cfg.cluster and running_server(cfg.state_dir) is None:
        raise fail(ConfigError(
            f"cluster mode: no tsnetchat server is running on {cfg.state_dir}, so nothing "
            "would share a new key with the cluster (a server adopts the cluster's key when "
            "it starts, undoing a rotation made while it was stopped). Run `tsnetchat token "
            "rotate-key` on a machine where a server of the cluster is running"))
    if os.path.lexists(cfg.key_path) and not cfg.key_path.is_symlink() and (
            not cfg.key_path.is_file()):
        # (a directory there was "there is no signing key ... is --state-dir the server's?":
        # an operator's run, 2026-11-25)
        raise fail(ConfigError(
            f"the token signing key {cfg.key_path} is not a regular file; remove it (the next "
            "start makes a new key, and every token must be issued again); nothing was "
            "rotated"))
    if not cfg.key_path.is_file():
        raise fail(ConfigError(
            f"there is no signing key at {cfg.key_path}, so nothing to rotate (is --state-dir "
            "or the config file the server's? a server makes the key when it first starts)"))
    try:
        auth.rotate_key(cfg.key_path)
    except OSError as e:
        raise fail(ConfigError(f"cannot write {cfg.key_path}: {e.strerror}")) from None
    if cfg.cluster:
        typer.echo(f"rotated {cfg.key_path}; the server running here shares the new key with "
                   "the cluster: every token issued before is refused on every server within "
                   "a few seconds")
    else:
        typer.echo(f"rotated {cfg.key_path}; every token issued before is now refused")


# --- backup and restore ------------------------------------------------------------------


@app.command(name="backup")
def backup_cmd(
    file: Annotated[Path, typer.Argument(help="Where to write the copy (replaced if it "
                                         "exists).")],
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Copy the history and token records to FILE: a consistent copy as of one moment,
    also while the server runs (never `cp` a live database)."""
    from .backup import backup

    if str(file) == "-":  # (it wrote a file named "-", and `backup - | gzip` got nothing)
        raise fail(InvalidInput("backup writes a file, not standard output (SQLite copies the "
                                "history into a file): give its name, e.g. "
                                "/var/backups/tsnetchat.db"))
    cfg = _operator_config(config, state_dir=state_dir)
    _cluster_blind(cfg)
    stopped_by: list[int] = []

    def stop(signum: int, frame: Any) -> None:  # (raised where the copy is: it cleans up)
        stopped_by.append(signum)
        raise KeyboardInterrupt

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        summary = backup(cfg.db_path, file)
    except TsnetchatError as e:
        raise fail(e) from None
    except KeyboardInterrupt:
        typer.secho(f"backup stopped: nothing was written to {file}", err=True, fg="yellow")
        raise typer.Exit(128 + (stopped_by[0] if stopped_by else signal.SIGINT)) from None
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    typer.echo(f"backed up {summary.describe()} to {file}")


@app.command(name="restore")
def restore_cmd(
    file: Annotated[Path, typer.Argument(help="A file `tsnetchat backup` wrote.")],
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Put a backup in place of the history (stop the server first). The database it
    replaces is kept beside it; clients start over from the restored history. Not for a
    cluster server: its history is the cluster's NATS stream."""
    from .backup import restore

    cfg = _operator_config(config, state_dir=state_dir)
    if cfg.cluster or _cluster_unsaid(cfg):
        # (It put the backup in place of cluster.db and said clients start over from it: the
        # server made its copy from the stream again, and nothing changed for anyone; a
        # newcomer's run, 2026-11-25.)
        from .cluster import STREAM

        raise fail(ConfigError(
            f"{cfg.state_dir} is a cluster server's: its history is the NATS cluster's stream "
            f"{STREAM}, and {CLUSTER_DB} only this server's copy of it, made again from the "
            "stream, so a restore there changes nothing; nothing was changed. To serve a "
            "backup on its own, restore it into a server without `cluster`; the stream "
            "itself is restored with NATS's tools (`nats stream restore`)"))
    new_dir = not cfg.state_dir.exists()
    try:
        summary = restore(file, cfg.db_path, cfg.state_dir)
    except TsnetchatError as e:
        raise fail(e) from None
    typer.echo(f"restored {summary.describe()} from {file} into {cfg.db_path}")
    if summary.replaced is not None:
        typer.echo(f"the history it replaced is kept as {summary.replaced}")
    # (a mistyped --state-dir was made and "restored" into, and read as done: an operator's
    # run, 2026-11-24)
    if new_dir:
        typer.echo(f"note: {cfg.state_dir} did not exist and was made: if the server's state "
                   "dir is another (the units use /var/lib/tsnetchat), restore there")
    if not cfg.key_path.exists():
        typer.echo(f"note: {cfg.state_dir} has no signing key (jwt.key): the server will make "
                   "a new one, and every token issued before is refused; to keep them, copy "
                   "the old server's jwt.key there before it starts")


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective server config (file < env < flags), secrets masked."""
    cfg = _server_config(config)
    for k, v in cfg.masked().items():
        typer.echo(f"{k} = {json.dumps(v)}")


# --- client commands -----------------------------------------------------------------

ServerArg = Annotated[str, typer.Argument(help="Server: MagicDNS name, full name or tailnet IP.")]
RoomOpt = Annotated[str, typer.Option(
    "--room", "-r", callback=room_option,
    help="Room: general or #general, +private, dm:LOGIN,... or a direct message's short "
         "name: @person, dm:person.")]
# edit and delete name their room always: ids are counted per room, so `delete SERVER 2`
# meant for a DM deleted #general's message 2 (an admin's, for good: a new user's day,
# 2026-11-24).
RoomNeeded = Annotated[str, typer.Option(
    "--room", "-r", callback=room_option,
    help="The room the message is in (ids are per room): general or #general, +private, "
         "@person, dm:LOGIN,...")]
TimeoutOpt = Annotated[float, typer.Option(
    help="Seconds to wait for the server to store it (through reconnects).",
    min=0.1, max=86400.0)]
SplitOpt = Annotated[bool, typer.Option(
    "--split", help="Text over the server's limit goes as several messages, cut between "
    "lines or words as the chat cuts a long paste (up to 256 KiB).")]
# (a command line is readable by every user of the machine, `ps`: an attacker's run,
# 2026-11-25; the help says so rather than refusing what scripts already pass)
TokenOpt = Annotated[str | None, typer.Option(
    help="Token (or TSNETCHAT_TOKEN). Other users of this machine can see a command line "
         "(ps): prefer --token-file or the variable.")]
TokenFileOpt = Annotated[Path | None, typer.Option(help="File holding the token.")]
ProxyOpt = Annotated[str | None, typer.Option(
    help="The local node's proxy in userspace-networking mode: socks5://127.0.0.1:1055 or "
         "http://127.0.0.1:1055 (or TSNETCHAT_PROXY).")]
ClientSocketOpt = Annotated[str | None, typer.Option(
    help="tailscaled's LocalAPI socket (default: look in the usual places).")]
# (every command needed --port when the server was not on 50051: a daily user's run,
# 2026-11-24; TSNETCHAT_PORT is the server's setting of the same port)
PortOpt = Annotated[int, typer.Option(help="Server port.", min=1, max=65535,
                                      envvar="TSNETCHAT_PORT")]
# Message ids are the protocol's uint64, kept to what SQLite stores: client.MAX_MESSAGE_ID
# (and the server's ledger.MAX_ID), not imported so that the CLI starts without the client.
MAX_ID = 2**63 - 1
# Page sizes and offsets are the protocol's uint32; the server caps pages lower still.
MAX_COUNT = 2**31 - 1
AddressOpt = Annotated[str | None, typer.Option(hidden=True, help="host:port, skip discovery.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Say how the server was found and how it is dialled.")]


def _client_settings(server: str, token: str | None, token_file: Path | None,
                     socket: str | None, proxy: str | None) -> dict[str, Any]:
    """Token (None: the stored one, looked up once discovery found the server), LocalAPI
    socket ("" = the usual places) and proxy, from flags and TSNETCHAT_* variables."""
    from .tokens import explicit_token

    try:
        tok = explicit_token(token, token_file)
    except TsnetchatError as e:
        raise fail(e) from None
    return {"token": tok,
            "socket": socket or os.environ.get("TSNETCHAT_SOCKET", ""),
            "proxy": proxy if proxy is not None else os.environ.get("TSNETCHAT_PROXY", "")}


def _say_step(step: Any) -> None:
    typer.echo(step.line(), err=True)


def _report(verbose: bool) -> Any:
    return _say_step if verbose else None


async def _find(server: str, port: int, settings: dict[str, Any], verbose: bool) -> Any:
    """Discovery and route alone (connect -v before the terminal opens, --save-token)."""
    from .discovery import discover, route

    found = await discover(server, socket=settings["socket"], report=_report(verbose))
    await route(found, port, proxy=settings["proxy"], report=_report(verbose))
    return found


@app.command(name="connect")
def connect_cmd(
    server: ServerArg,
    room: Annotated[str | None, typer.Option(
        "--room", "-r", help="The room to show first (opened if it was not). Default: the "
             "one shown when the last chat with this server ended, else general; the rooms "
             "open then are opened again either way.")] = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None, socket: ClientSocketOpt = None, proxy: ProxyOpt = None,
    port: PortOpt = 50051, address: AddressOpt = None,
    save_token: Annotated[bool, typer.Option(help="Remember the token for this server.")] = False,
    verbose: VerboseOpt = False,
    notify: Annotated[bool, typer.Option(
        help="Also a desktop notification when you are mentioned (notify-send, or the "
             "terminal's own).")] = False,
) -> None:
    """Interactive terminal chat."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        typer.secho("error: `tsnetchat connect` is the interactive chat and needs a terminal; "
                    "in scripts use `tsnetchat send` to post and `tsnetchat tail` to follow a "
                    "room", err=True, fg="red")
        raise typer.Exit(2)
    s = _client_settings(server, token, token_file, socket, proxy)
    if save_token:
        _may_save_token(s["token"], address)
    if (verbose or save_token) and not address:
        found = run(_find(server, port, s, verbose))
        if save_token:
            _save_token(found.node, server, s["token"], port)
    from .tui import run_tui

    raise typer.Exit(run(run_tui(server, room, port=port, address=address or "", notify=notify,
                                 **s)))


def _link(server: str, port: int, address: str | None, settings: dict[str, Any],
          verbose: bool = False) -> Any:
    from .client import link_for

    return link_for(server, settings["token"], socket=settings["socket"],
                    proxy=settings["proxy"], port=port, address=address or "",
                    report=_report(verbose))


@app.command()
def login(
    server: ServerArg, socket: ClientSocketOpt = None, proxy: ProxyOpt = None,
    port: PortOpt = 50051, verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ask the server for a token of your own (when it hands them out), and keep it.

    The server checks who you are on the tailnet; your rooms come from the tailnet grant.
    The token renews itself while you use tsnetchat."""
    from .tokens import login as ask

    s = _client_settings(server, None, None, socket, proxy)
    entry, res = run(ask(server, socket=s["socket"], port=port, proxy=s["proxy"],
                         report=_report(verbose), warn=_warn))
    rooms = "any room" if "*" in res.rooms else ", ".join(res.rooms)
    if json_out:
        typer.echo(json.dumps({"login": res.identity.login, "server": entry.name,
                               "node_id": entry.node_id, "token_id": res.token_id,
                               "rooms": list(res.rooms), "admin": res.admin,
                               "expires": res.expires_unix}))
        return
    exp = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.expires or 0))
    typer.echo(f"logged in to {entry.name} as {res.identity.login} (rooms: {rooms}"
               f"{'; admin' if res.admin else ''}).\nThe token is kept in "
               f"{store_location()} and renews itself while you use tsnetchat "
               f"(unused, it expires {exp}).")


def store_location() -> str:
    from .tokens import store_path

    return str(store_path())


@app.command()
def send(
    server: ServerArg, text: Annotated[str, typer.Argument(help="Message text ('-' = stdin).")],
    room: RoomOpt = "general", action: Annotated[bool, typer.Option(help="Send as /me.")] = False,
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    timeout: TimeoutOpt = 15.0, split: SplitOpt = False,
    json_out: Annotated[bool, typer.Option("--json")] = False, verbose: VerboseOpt = False,
) -> None:
    """Send one message and print its id once the server has stored it.

    With --split, text over the server's limit goes as several messages, and their ids are
    printed."""
    from . import clientcmds
    from .pb import chat_pb2 as pb

    s = _client_settings(server, token, token_file, socket, proxy)
    body = _message_text(text, split)
    kind = pb.MESSAGE_KIND_ACTION if action else pb.MESSAGE_KIND_TEXT
    typer.echo(run(clientcmds.send(_link(server, port, address, s, verbose), room, body,
                                   kind=kind, timeout=timeout, json_out=json_out,
                                   split=split), changes=True))


def _message_text(text: str, split: bool = False) -> str:
    """The message: ``text``, or stdin for "-", read up to a little past the most any server
    takes, or `--split` sends (never a whole pipe); bytes that are not UTF-8 are kept as
    surrogates, so ``clientcmds.send`` refuses the text (``outbox.sendable``) before
    dialling."""
    if text != "-":
        return text.rstrip("\r\n")
    from .outbox import most_sent

    raw = sys.stdin.buffer.read(most_sent(split) + 4096)
    return raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")


def _echo(line: str) -> None:
    # A line at a time, also into a pipe: `tail --json | jq` must see each message as it comes.
    typer.echo(line)
    sys.stdout.flush()


def _warn(line: str) -> None:
    typer.secho(line, err=True, fg="yellow")


@app.command()
def tail(
    server: ServerArg, room: RoomOpt = "general",
    after: Annotated[int | None, typer.Option(help="Start after this message id.", min=0,
                                              max=MAX_ID)] = None,
    new: Annotated[bool, typer.Option(
        "--new", help="From now on: no backlog, only what is sent from now.")] = False,
    count: Annotated[int, typer.Option(help="Exit after this many messages (0 = follow).",
                                       min=0, max=MAX_COUNT)] = 0,
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    json_out: Annotated[bool, typer.Option("--json")] = False, verbose: VerboseOpt = False,
) -> None:
    """Follow a room read-only: the backlog (or after --after, or --new), a "live" marker,
    then messages as they come. Reconnects and resumes on its own (in a cluster, through
    another server when its own goes away)."""
    from . import clientcmds

    if new and after is not None:
        raise fail(InvalidInput("--new and --after both say where to start; give one"))
    s = _client_settings(server, token, token_file, socket, proxy)
    run(clientcmds.tail(_link(server, port, address, s, verbose), room, after=after, new=new,
                        count=count, json_out=json_out, echo=_echo, warn=_warn))


@app.command()
def history(
    server: ServerArg, room: RoomOpt = "general",
    before: Annotated[int | None, typer.Option(help="Only messages before this id.", min=1,
                                               max=MAX_ID)] = None,
    limit: Annotated[int, typer.Option(
        min=1, max=MAX_COUNT, help="The last N messages, with the edits, deletions and topic "
        "changes among them.")] = 50,
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    json_out: Annotated[bool, typer.Option("--json")] = False, verbose: VerboseOpt = False,
) -> None:
    """Print a room's last messages (--json: one array)."""
    from . import clientcmds

    s = _client_settings(server, token, token_file, socket, proxy)
    run(clientcmds.history(_link(server, port, address, s, verbose), room, before=before,
                           limit=limit, json_out=json_out, echo=_echo))


# --- a team's day (issue 15) ------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json")]


@app.command()
def search(
    server: ServerArg, query: Annotated[str, typer.Argument(help="Words; all must occur; "
                                                             "word* matches a prefix.")],
    room: Annotated[list[str] | None, typer.Option(
        "--room", "-r", callback=lambda rooms: [room_option(r) for r in rooms or ()],
        help="Only this room (repeatable): as --room elsewhere.")] = None,
    author: Annotated[str, typer.Option(
        help="Only from this person: a login, or a short name at your own domain.")] = "",
    since: Annotated[str, typer.Option(
        help="Only from this time: 2026-11-24, 2026-11-24T09:30 (local time unless it says "
             "+01:00 or Z), a time ago (90m, 2h, 3d, 1w), or ms since the epoch.")] = "",
    until: Annotated[str, typer.Option(
        help="Only before this time (as --since).")] = "",
    newest: Annotated[bool, typer.Option("--newest", help="Newest first, not best first.")
                      ] = False,
    limit: Annotated[int, typer.Option(min=1, max=MAX_COUNT)] = 20,
    offset: Annotated[int, typer.Option(min=0, max=MAX_COUNT)] = 0,
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    json_out: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Search the rooms and direct conversations you may read."""
    from . import clientcmds

    since_ms, until_ms = _when("--since", since), _when("--until", until)
    s = _client_settings(server, token, token_file, socket, proxy)
    run(clientcmds.search(_link(server, port, address, s, verbose), query, rooms=room or [],
                          author=author, since_ms=since_ms, until_ms=until_ms, newest=newest,
                          limit=limit, offset=offset, json_out=json_out, echo=_echo))


@app.command()
def unread(
    server: ServerArg, token: TokenOpt = None, token_file: TokenFileOpt = None,
    socket: ClientSocketOpt = None, proxy: ProxyOpt = None, port: PortOpt = 50051,
    address: AddressOpt = None, json_out: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Unread messages and mentions per room and direct conversation (any device)."""
    from . import clientcmds

    s = _client_settings(server, token, token_file, socket, proxy)
    run(clientcmds.unread(_link(server, port, address, s, verbose), json_out=json_out,
                          echo=_echo))


@app.command()
def mentions(
    server: ServerArg,
    all_: Annotated[bool, typer.Option("--all", help="Also the ones already read.")] = False,
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    json_out: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Messages that mention you (unread ones, newest first)."""
    from . import clientcmds

    s = _client_settings(server, token, token_file, socket, proxy)
    run(clientcmds.mentions(_link(server, port, address, s, verbose), include_read=all_,
                            json_out=json_out, echo=_echo))


@app.command()
def edit(
    server: ServerArg, message_id: Annotated[int, typer.Argument(
        help="The id to edit (send, search and --json show ids).", min=1, max=MAX_ID)],
    text: Annotated[str, typer.Argument(help="The new text.")], room: RoomNeeded,
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    json_out: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Replace the text of one of your messages (within edit_window_seconds)."""
    from . import clientcmds

    s = _client_settings(server, token, token_file, socket, proxy)
    typer.echo(run(clientcmds.change(_link(server, port, address, s, verbose), room, "edit",
                                     target=message_id, text=text, json_out=json_out),
                   changes=True))


@app.command()
def delete(
    server: ServerArg, message_id: Annotated[int, typer.Argument(
        help="The id to delete (send, search and --json show ids).", min=1, max=MAX_ID)],
    room: RoomNeeded,
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    json_out: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Delete a message (yours, or any as an admin); its text is removed from the server."""
    from . import clientcmds

    s = _client_settings(server, token, token_file, socket, proxy)
    typer.echo(run(clientcmds.change(_link(server, port, address, s, verbose), room, "delete",
                                     target=message_id, json_out=json_out), changes=True))


@app.command()
def topic(
    server: ServerArg, text: Annotated[str | None, typer.Argument(
        help="The topic ('' clears it); without it, the topic is shown.")] = None,
    room: RoomOpt = "general",
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    json_out: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Set a room's topic (shown on join, with who set it and when), or show it."""
    from . import clientcmds

    s = _client_settings(server, token, token_file, socket, proxy)
    link = _link(server, port, address, s, verbose)
    if text is None:  # (as the chat's /topic: it was a "Missing argument" box)
        typer.echo(run(clientcmds.show_topic(link, room, json_out=json_out)))
        return
    typer.echo(run(clientcmds.change(link, room, "topic", text=text, json_out=json_out),
                   changes=True))


@app.command()
def dm(
    server: ServerArg, login: Annotated[str, typer.Argument(
        help="Whom to write to: logins, or short names at your own domain (comma-separated "
             "for several).")],
    text: Annotated[str, typer.Argument(help="Message text ('-' = stdin).")],
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    timeout: TimeoutOpt = 15.0, split: SplitOpt = False,
    json_out: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Send a direct message (the same as `send --room dm:LOGIN`)."""
    from . import clientcmds
    from .pb import chat_pb2 as pb

    s = _client_settings(server, token, token_file, socket, proxy)
    body = _message_text(text, split)
    to = ",".join(x.strip().lstrip("@") for x in login.split(","))  # (`dm SERVER @bob`)
    typer.echo(run(clientcmds.send(_link(server, port, address, s, verbose), f"dm:{to}",
                                   body, kind=pb.MESSAGE_KIND_TEXT, timeout=timeout,
                                   json_out=json_out, split=split), changes=True))


@app.command("room-members")
def room_members(
    server: ServerArg, room: Annotated[str, typer.Argument(help="A private room: +name.")],
    add: Annotated[list[str] | None, typer.Option(help="Invite this login (repeatable).")
                   ] = None,
    remove: Annotated[list[str] | None, typer.Option(help="Remove this login (repeatable).")
                      ] = None,
    create: Annotated[bool, typer.Option("--create", help="Create the room.")] = False,
    token: TokenOpt = None, token_file: TokenFileOpt = None, socket: ClientSocketOpt = None,
    proxy: ProxyOpt = None, port: PortOpt = 50051, address: AddressOpt = None,
    json_out: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Admin: create a private room, or invite and remove its members."""
    from . import clientcmds

    s = _client_settings(server, token, token_file, socket, proxy)
    typer.echo(run(clientcmds.members(_link(server, port, address, s, verbose), room,
                                      create=create, add=add or [], remove=remove or [],
                                      json_out=json_out)))


def _when(flag: str, text: str) -> int:
    """``search``'s ``--since``/``--until`` in ms since the epoch (0: not given)."""
    from .commands import when_ms

    if not text.strip():
        return 0
    try:
        ms = when_ms(text, time.time())
    except ValueError as e:
        raise fail(InvalidInput(f"{flag}: {e}")) from None
    if ms > MAX_ID:
        raise fail(InvalidInput(f"{flag}: {text!r} is too far in the future"))
    return ms


@app.command()
def whoami(
    server: ServerArg, token: TokenOpt = None, token_file: TokenFileOpt = None,
    socket: ClientSocketOpt = None, proxy: ProxyOpt = None, port: PortOpt = 50051,
    address: AddressOpt = None, verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="(The output is always JSON.)")] = True,
    save_token: Annotated[bool, typer.Option(
        help="Keep the token given with --token or --token-file for this server, once the "
             "server has taken it (a script's or bot's way; `connect --save-token` needs a "
             "terminal).")] = False,
) -> None:
    """Who the server thinks you are, and what you may do (JSON)."""
    from . import clientcmds

    s = _client_settings(server, token, token_file, socket, proxy)
    if save_token:
        _may_save_token(s["token"], address)
    link = _link(server, port, address, s, verbose)
    out = run(clientcmds.whoami(link))
    if save_token:
        _save_token(link.target.node if link.target else None, server, s["token"], port)
    typer.echo(out)


def _may_save_token(token: str | None, address: str | None) -> None:
    """Refuse --save-token without a token given, or with --address (before any call)."""
    if not token:
        raise fail(ConfigError("--save-token: give the token with --token or --token-file"))
    if address:
        raise fail(ConfigError("--save-token keeps a token under the server's tailnet node, "
                               "which --address skips: leave --address out"))


def _save_token(node: Any, server: str, token: str, port: int) -> None:
    """Keep an admin's ``token`` for the server at ``port`` on the ``node`` that discovery
    found (--save-token)."""
    from .tokens import save_admin_token

    if node is None:  # (discovery always names it; belt and braces)
        raise fail(ConfigError(f"--save-token: {server} was not found on the tailnet"))
    try:
        where = save_admin_token(node, token, port=port)
    except TsnetchatError as e:
        raise fail(e) from None
    typer.echo(f"saved the token for {node.dns_name or server} in {where}", err=True)


@app.command()
def doctor(
    config: ConfigOpt = None, socket: SocketOpt = None,
    server: Annotated[str | None, typer.Option(
        help="Check this machine as a client of that server instead: how discovery finds it, "
             "how it is dialled, the token, and whether it answers.")] = None,
    token: TokenOpt = None, token_file: TokenFileOpt = None, proxy: ProxyOpt = None,
    state_dir: StateOpt = None,
    port: Annotated[int | None, typer.Option(
        help="With --server, that server's port (default 50051, or TSNETCHAT_PORT); "
             "without, this server's (default: its config's).")] = None,
    api: Annotated[bool, typer.Option(
        "--api", help="Also ask Tailscale's API about this server's device and policy.")] = False,
    embedded: Annotated[bool | None, typer.Option(
        "--embedded/--system-tailscaled",
        help="The server runs its own tailscaled (serve --embedded, tsnetchat-embedded): check "
             "that one.")] = None,
) -> None:
    """Check this node and explain what is wrong, one line per check."""
    if server is not None and not server.strip():
        raise fail(InvalidInput("--server: give the server's name (e.g. chat-server)"))
    # Each check reads only its own flags: those of the other were passed over without a
    # word (`doctor --server chat-server --api` asked no API; `doctor --token-file F`
    # checked no token: an operator's run, 2026-11-25).
    other = ([f for f, v in (("--api", api), ("--state-dir", state_dir), ("--config", config),
                             ("--embedded", embedded)) if v] if server else
             [f for f, v in (("--token", token), ("--token-file", token_file),
                             ("--proxy", proxy)) if v is not None])
    if other and server:
        raise fail(InvalidInput(
            f"{other[0]} is for checking this machine's own server (`sudo tsnetchat doctor "
            f"{other[0]} ...`); with --server, doctor checks the way from here to that server"))
    if other:
        raise fail(InvalidInput(
            f"{other[0]} is for checking a server from a client (`tsnetchat doctor --server "
            f"NAME {other[0]} ...`); without --server, doctor checks this machine's own server"))
    if server:
        from .doctor import run_client_doctor

        flag, said = "--port", str(port)
        if port is None and os.environ.get("TSNETCHAT_PORT", "").strip():  # (as the others)
            flag, said = "TSNETCHAT_PORT", os.environ["TSNETCHAT_PORT"].strip()
            port = int(said) if said.isascii() and said.isdigit() else -1
        if port is not None and not 1 <= port <= 65535:  # (0 checked 50051: an operator's run)
            raise fail(InvalidInput(f"{flag}: {said!r} is not a TCP port (1-65535)"))
        s = _client_settings(server, token, token_file, socket, proxy)
        ok = run(run_client_doctor(server, port=port or DEFAULT_PORT, **s))
        raise typer.Exit(0 if ok else 1)
    from .doctor import run_doctor

    # (a client-only install was told only what to install; a newcomer, 2026-11-24)
    _need_server("; to check this machine as a client, `tsnetchat doctor --server NAME`")
    cfg = _operator_config(config, socket=socket, state_dir=state_dir, port=port,
                           embedded=embedded)
    ok = run(run_doctor(cfg, with_api=api))
    raise typer.Exit(0 if ok else 1)


@app.command(name="install-systemd")
def install_systemd(
    embedded: Annotated[bool, typer.Option(help="Install the embedded-tailscaled unit.")] = False,
    dest: Annotated[Path, typer.Option(help="Unit directory.")] = Path("/etc/systemd/system"),
) -> None:
    """Install the shipped systemd unit (then: systemctl daemon-reload && enable --now)."""
    from .systemd import AUTHKEY, install_unit

    try:
        path, warning = install_unit(dest, embedded=embedded)
    except TsnetchatError as e:
        raise fail(e) from None
    typer.echo(f"installed {path}")
    if warning:  # (written all the same: a newcomer, 2026-11-24)
        typer.echo(f"warning: {warning}", err=True)
    if embedded:
        typer.echo(f"the auth key: {AUTHKEY} (mode 0600; read through the credential "
                   "'authkey'), or an OAuth client (see README, Operations)")
    if embedded and not os.path.lexists(AUTHKEY):
        # (without it systemd said only "Failed to set up credentials: Protocol error",
        # status 243/CREDENTIALS: an operator's run in the systemd container, 2026-11-25)
        typer.echo(f"warning: {AUTHKEY} does not exist yet, and the unit does not start "
                   "without it (systemd: status=243/CREDENTIALS): put an auth key "
                   f"(tskey-auth-...) or an OAuth client's secret in it first: sudo install "
                   f"-D -m 600 /dev/stdin {AUTHKEY}", err=True)
    typer.echo(f"next: systemctl daemon-reload && systemctl enable --now {path.name}")


# --- Tailscale's API: provisioning and grants ----------------------------------------


@app.command(name="provision")
def provision_cmd(
    hostname: Annotated[str | None, typer.Option(
        help="The name the node will join as (default: the config's hostname).")] = None,
    tags: Annotated[str | None, typer.Option(
        help="Tags for the key, comma-separated (default: the config's tags).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write the key to this file (mode 0600) instead of printing it.")] = None,
    ephemeral: Annotated[bool, typer.Option(help="A key for an ephemeral node.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Mint a pre-authorised, tagged auth key through Tailscale's API (an OAuth client), after
    removing or reporting a stale device that still holds the node's name."""
    from .provision import open_out, provision

    cfg = _server_config(config, hostname=hostname, tags=tags)
    fd = made = None
    if out is not None:
        try:
            fd, made = open_out(out)
        except TsnetchatError as e:
            raise fail(e) from None
    try:
        key, holders = run(provision(cfg, cfg.hostname, ephemeral=ephemeral))
    except BaseException:
        if fd is not None:
            os.close(fd)
            if made and out is not None:
                out.unlink(missing_ok=True)
        raise
    for h in holders:
        typer.echo(h.message(cfg.hostname), err=True)
    if fd is None:
        typer.echo(key)
        return
    try:
        with os.fdopen(fd, "w") as f:
            os.ftruncate(f.fileno(), 0)
            os.fchmod(f.fileno(), 0o600)
            f.write(key + "\n")
    except OSError as e:  # (a full disk) the key was minted but is lost; it expires unused
        raise fail(ConfigError(f"--out {out}: {e.strerror}")) from None
    typer.echo(f"wrote a single-use auth key for {cfg.hostname} to {out}", err=True)


@grants_app.command("show")
def grants_show(config: ConfigOpt = None,
                json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the tsnetchat grants of the tailnet policy file, each with its id."""
    from .grants import read

    cfg = _server_config(config)
    _, found = run(read(cfg))
    if json_out:
        typer.echo(json.dumps([g.as_json() for g in found]))
        return
    for g in found:
        typer.echo(g.describe())
    if not found:
        typer.echo(f"no grant of {cfg.cap_name} in the policy file", err=True)


@grants_app.command("add")
def grants_add(
    src: Annotated[list[str], typer.Option(
        help="Who (repeat): a login, group:x, tag:x, autogroup:member or *.")],
    dst: Annotated[list[str] | None, typer.Option(
        help="Which server (repeat; default: the config's tags).")] = None,
    room: Annotated[list[str] | None, typer.Option(
        help="A room they may use (repeat; default all).")] = None,
    admin: Annotated[bool, typer.Option(help="May kick and revoke.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Add a tsnetchat grant; the API validates the policy before it is saved."""
    from .grants import apply, describe_new, new_grant, with_grant

    cfg = _server_config(config)
    try:
        entry = new_grant(cfg.cap_name, src=src, dst=dst or cfg.tag_list, rooms=room or [],
                          admin=admin)
    except TsnetchatError as e:
        raise fail(e) from None
    run(apply(cfg, lambda text: with_grant(text, entry)))
    typer.echo(f"added {describe_new(entry, cfg.cap_name)}")


@grants_app.command("remove")
def grants_remove(grant_id: Annotated[str, typer.Argument(help="The id `grants show` gives.")],
                  config: ConfigOpt = None) -> None:
    """Remove a tsnetchat grant by its id (the rest of the policy file stays as it was)."""
    from .grants import apply, without_grant

    cfg = _server_config(config)
    run(apply(cfg, lambda text: without_grant(text, cfg.cap_name, grant_id)))
    typer.echo(f"removed grant {grant_id}")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    try:
        app()
    except Exception as e:
        if os.environ.get("TSNETCHAT_TRACEBACK"):  # (for a bug report, when asked for)
            raise
        if isinstance(e, PermissionError):
            # The operator's commands (token, backup, doctor, ...) read the server's state
            # dir, which is the server's alone (0700): run without sudo, each ended in a
            # traceback.
            where = f" {e.filename}" if e.filename else ""
            typer.secho(f"error: permission denied:{where} (the server's files are readable "
                        "by the user it runs as: try again with sudo)", err=True, fg="red")
            raise SystemExit(EXIT[ConfigError]) from None
        # The last boundary: whatever a command did not foresee is one line, not a traceback
        # (doctor on a database that was not SQLite ended in one: an operator's run,
        # 2026-11-24).
        typer.secho(f"error: unexpected {type(e).__name__}: {e}. This is a bug in tsnetchat; "
                    "TSNETCHAT_TRACEBACK=1 shows where it happened", err=True, fg="red")
        raise SystemExit(1) from None
