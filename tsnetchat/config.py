"""Server configuration: one type, three sources.

Precedence, lowest first: built-in defaults < TOML file < ``TSNETCHAT_*`` environment
variables < command-line flags. ``load_config`` merges them and validates once; a bad
value raises ConfigError naming where it came from (``--port``, ``TSNETCHAT_PORT`` or
``config.toml: port``). ``ServerConfig`` is immutable after that: data flows one way,
CLI -> config -> server.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_PORT = 50051

ENV_PREFIX = "TSNETCHAT_"
DEFAULT_CONFIG_FILE = Path("/etc/tsnetchat/config.toml")
# Always used with fullmatch: `$` in a `match` pattern also matches before a final newline,
# which let "general\n" through as a look-alike room.
ROOM_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
PRIVATE_RE = re.compile(r"\+[a-z0-9][a-z0-9_-]{0,31}")  # a private room: +name
LOGIN_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+|tag:[a-z0-9][a-z0-9-]*")
SECRET_FIELDS = frozenset({"auth_key", "api_key", "oauth_client_secret", "nats_password"})
DEFAULT_API_URL = "https://api.tailscale.com"
TAG_RE = re.compile(r"tag:[A-Za-z0-9][A-Za-z0-9-]*")  # fullmatch
# Upper bounds: a number beyond them starts a server that fails every call (a count is sent
# in the protocol's 32-bit fields; a lifetime of 1e15 hours is a date past year 9999).
MAX_NUMBER = 2**31 - 1
MIN_SECONDS = 0.1  # the shortest wait a setting in seconds may be
MAX_OF = {"token_ttl_hours": 3650 * 24, "enroll_ttl_hours": 3650 * 24,
          "retention_days": 36_500,
          "store_wait": 2_147_483}  # (SQLite's busy timeout: a C int of milliseconds)


# The history database's name in the state dir: a single server's, and in cluster mode this
# server's copy of the cluster (``ServerConfig.db_path``).
SINGLE_DB, CLUSTER_DB = "tsnetchat.db", "cluster.db"


def default_state_dir() -> Path:
    # systemd's StateDirectory= sets STATE_DIRECTORY; a service user may have no home.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/tsnetchat")
    return user_state_dir()


# Where the shipped units keep the state (StateDirectory=tsnetchat), and root's default.
SERVICE_STATE_DIR = Path("/var/lib/tsnetchat")


def for_operator(cfg: ServerConfig) -> ServerConfig:
    """``cfg`` for an operator's command (token, backup, restore, doctor) run by a user other
    than root: when nothing named a state dir, the user has no server state of their own and
    the units' state dir is there, that one, whose server this user means (and so is told
    to use sudo, as the README says). (`tsnetchat doctor` without sudo on the units'
    machine checked ~/.local/state/tsnetchat and said another program held the server's
    port; `token list` and `backup` said there was no history: an operator's run in the
    systemd container, 2026-11-25.)"""
    own = cfg.state_dir
    if ("state_dir" in cfg.origins or os.geteuid() == 0 or os.environ.get("STATE_DIRECTORY")
            or any(os.path.lexists(own / n) for n in (SINGLE_DB, CLUSTER_DB, "jwt.key"))
            or not os.path.lexists(SERVICE_STATE_DIR)):
        return cfg
    return replace(cfg, state_dir=SERVICE_STATE_DIR,
                   origins={**cfg.origins, "state_dir": f"state_dir ({SERVICE_STATE_DIR}, the "
                                                        "units' state dir)"})


def user_state_dir() -> Path:
    """This user's tsnetchat state, ``$XDG_STATE_HOME/tsnetchat`` (by default
    ``~/.local/state/tsnetchat``): the chat's log, what it kept unsent, its open rooms; and
    a server's state when it runs as this user without ``--state-dir``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tsnetchat"


@dataclass(frozen=True)
class Limits:
    """The chat limits: what a SIGHUP reload changes for calls and streams already running
    (``ChatService.apply``). Defined once: they are also ServerConfig's keys."""

    max_message_bytes: int = 4096
    history_on_join: int = 50
    max_page: int = 200
    rate_burst: int = 20  # messages per person: burst, then rate_per_second
    rate_per_second: float = 5.0
    max_rooms_per_client: int = 16
    subscriber_queue: int = 2048
    call_burst: int = 200  # RPCs per person: burst, then call_rate per second
    call_rate: float = 50.0
    # A team's day (issue 15). Authors may edit or delete their messages for this long
    # (0 = always); admins may delete any message at any time.
    edit_window_seconds: float = 900.0
    edits_per_minute: int = 30  # edits, deletions and topic changes per person
    max_topic_bytes: int = 256  # also away messages
    topic_admins_only: bool = False  # False: whoever may use a room may set its topic
    max_dm_members: int = 8  # people in one direct conversation, the sender included
    search_max_query_bytes: int = 256
    searches_per_minute: int = 30  # per person
    # History answers per person (bursts of service.HISTORY_BURST_SECONDS' worth): an attacker's
    # valid token asking 46 pages of 800 KB a second put alice's WhoAmI at p99 562 ms.
    history_kib_per_second: int = 2048
    max_search_page: int = 50
    # Not a limit, but reloadable like one: True lets admins read every direct conversation
    # (History, Subscribe, search); False (the default) keeps them to their members.
    admins_read_dms: bool = False


@dataclass(frozen=True)
class ServerConfig(Limits):
    """Everything `tsnetchat serve` needs. Field names are the TOML keys and, upper-cased
    with the TSNETCHAT_ prefix, the environment variables. The chat limits come first
    (inherited from Limits)."""

    state_dir: Path = field(default_factory=default_state_dir)
    socket: str = ""  # LocalAPI socket; "" = the system tailscaled's default
    port: int = DEFAULT_PORT
    # "auto" = ask tailscaled: its tailnet IPs with TUN, loopback in userspace mode.
    # A comma-separated list overrides (tests); unspecified addresses are refused.
    listen: str = "auto"
    startup_timeout: float = 60.0
    whois_timeout: float = 2.0
    # Authorization
    cap_domain: str = "example.com"  # grants are read from <cap_domain>/cap/tsnetchat
    require_grant: bool = False  # True: no app-capability grant = no access
    # True: connections from the server's own node (local processes going out through its
    # tailscaled and back in) are let in like any other device; by default they are refused.
    allow_own_node: bool = False
    # Seconds between re-asking tailscaled about every device with an open stream: the
    # backstop for changes it does not announce on its IPN bus (see gate.py).
    recheck_interval: float = 10.0
    # Connections one device may hold open at once, enforced when the server holds more
    # connections than its calls account for (connguard.py); 0 = no limit. A chat or a
    # script uses one or two.
    max_connections_per_device: int = 64
    token_ttl_hours: float = 24.0 * 30  # `tsnetchat token issue` without --ttl
    # Self-service tokens (`tsnetchat login`, enroll.py): "off", "grant" (people with a tailnet
    # grant of cap_name) or "any" (every tailnet user). Off unless the admin opts in.
    enroll: str = "off"
    enroll_ttl_hours: float = 24.0 * 7  # renewed while in use (enroll.py)
    retention_count: int = 100_000  # per room; 0 = keep all
    retention_days: float = 0.0  # 0 = keep forever
    fsync: bool = False  # True: survive power loss, not only a crashed process
    # Seconds a message may wait for the history database (locked by another process, a
    # stalled disk) before it is refused as not stored (the sender may send it again).
    store_wait: float = 5.0
    # gRPC's helper threads run SCHED_BATCH so they do not preempt the event loop (loop.py)
    batch_helper_threads: bool = True
    shutdown_grace: float = 5.0
    # Embedded tailscaled (serve --embedded)
    embedded: bool = False
    hostname: str = "chat-server"
    tailscaled_path: str = "tailscaled"
    login_server: str = ""  # "" = Tailscale's default control plane
    auth_key: str = ""
    auth_key_file: str = ""
    # Tailscale's API (tsapi.py): off unless an API key or an OAuth client is given
    api_key: str = ""
    oauth_client_id: str = ""
    oauth_client_secret: str = ""  # or in the `authkey` credential/file (tskey-client-...)
    tailnet: str = "-"  # "-" = the credentials' own tailnet
    api_url: str = DEFAULT_API_URL  # where api.tailscale.com is reached (tests: a stand-in)
    tags: str = ""  # comma-separated; minted auth keys carry them, grants default to them
    stale_device: str = "remove"  # a fresh node's name held by an offline device: remove|report
    # Cluster mode (tsnetchat.cluster): "" = one server on SQLite (the default); otherwise the
    # NATS JetStream cluster's URLs, comma-separated (nats://host:4222,nats://host2:4222).
    cluster: str = ""
    nats_user: str = ""
    nats_password: str = ""  # or in a file / the `nats` systemd credential (nats_credentials)
    # A NATS .creds file (user JWT + nkey), or a file holding the password; "" = the `nats`
    # credential in $CREDENTIALS_DIRECTORY when there is one.
    nats_credentials: str = ""
    # Seconds a send waits for the cluster to confirm it (a stream leader's election takes
    # 4-9 s, docs/nats-cluster.md fact 2) before it is refused as not confirmed.
    cluster_wait: float = 12.0
    cluster_replicas: int = 3  # copies of every message in JetStream (a quorum acks)
    # Operations
    # 0 = off; otherwise a Prometheus text endpoint on the same addresses, behind the tailnet
    # lock (only connections that come through tailscaled from another device).
    metrics_port: int = 0
    log_level: str = "info"
    # Not a setting: where each setting that is not a default came from, as ``where`` says
    # it (``load_config`` fills it in). Errors found after loading name the same place.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False,
                                       metadata={"setting": False})
    file: Path | None = field(default=None, compare=False, metadata={"setting": False})

    def secrets_open_to_others(self) -> list[str]:
        """The secrets this config's file holds when others may read the file (the unit's
        service user needs to: such secrets belong in systemd credentials or a 0600 file).
        (nats_password in a 0644 config.toml was taken without a word, where a 0644
        nats_credentials file is refused: an operator's run, 2026-11-24.)"""
        if self.file is None:
            return []
        try:
            if not self.file.stat().st_mode & 0o044:
                return []
        except OSError:
            return []
        prefix = f"{self.file}: "
        return sorted(n for n in SECRET_FIELDS
                      if getattr(self, n) and self.origins.get(n, "").startswith(prefix))

    def where(self, name: str) -> str:
        """Where setting ``name`` came from, for an error: ``--auth-key-file``,
        ``TSNETCHAT_AUTH_KEY_FILE``, ``/etc/tsnetchat/config.toml: auth_key_file``, or the
        name itself (a default)."""
        return self.origins.get(name, name)

    @property
    def limits(self) -> Limits:
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})

    @property
    def cap_name(self) -> str:
        return f"{self.cap_domain}/cap/tsnetchat"

    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]

    @property
    def db_path(self) -> Path:
        # In cluster mode the database is this server's copy of the cluster's stream, kept
        # apart from a single server's history it may have had before.
        return self.state_dir / (CLUSTER_DB if self.cluster else SINGLE_DB)

    @property
    def cluster_urls(self) -> list[str]:
        return [u.strip() for u in self.cluster.split(",") if u.strip()]

    @property
    def key_path(self) -> Path:
        return self.state_dir / "jwt.key"

    @property
    def embedded_dir(self) -> Path:
        return self.state_dir / "tailscaled"

    def effective_socket(self) -> str:
        from .tailnet import DEFAULT_SOCKET

        if self.socket:
            return self.socket
        if self.embedded:
            return str(self.embedded_dir / "tailscaled.sock")
        return DEFAULT_SOCKET

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data, secrets replaced (for `config show`)."""
        out: dict[str, Any] = {}
        for f in settings():
            v = getattr(self, f.name)
            if f.name in SECRET_FIELDS and v:
                v = "********"
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out


# Settings that are lists, written comma-separated ("tag:a,tag:b"); a TOML file may also give
# a list of strings. (`tags = ["tag:chat"]`, as TOML people write lists, was refused as "expected
# a string": an operator's run, 2026-11-25.)
LISTS = frozenset({"tags", "cluster", "listen"})
# Settings that are one of a few words.
CHOICES = {"enroll": ("off", "grant", "any"), "stale_device": ("remove", "report"),
           "log_level": ("debug", "info", "warning", "error")}


def _convert(name: str, raw: Any, typ: Any, where: str) -> Any:
    try:
        if typ in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typ in (int, "int"):
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError("expected a whole number")
            try:
                return int(raw)
            except ValueError:  # ("invalid literal for int() with base 10": a newcomer)
                raise ValueError("expected a whole number") from None
        if typ in (float, "float"):
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            try:
                value = float(raw)
            except ValueError:  # ("could not convert string to float")
                raise ValueError("expected a number") from None
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return value
        if name in LISTS and isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return ",".join(raw)
        # A TOML number or list where text belongs is a mistake, not a name to use.
        if not isinstance(raw, str | os.PathLike):
            raise ValueError("expected a string" + (
                ', or a list of them (["a", "b"])' if name in LISTS else
                f": one of {', '.join(CHOICES[name])}" if name in CHOICES else ""))
        if typ in (Path, "Path"):
            return Path(raw).expanduser()
        return str(raw)
    except (TypeError, ValueError, OverflowError) as e:
        # (TOML's true as TOML writes it: "invalid value True" read as Python's; a
        # newcomer's `enroll = true`, 2026-11-25)
        shown = str(raw).lower() if isinstance(raw, bool) else repr(raw)
        raise ConfigError(f"{where}: invalid value {shown} for {name}: {e}") from None


def settings() -> tuple[Field[Any], ...]:
    """ServerConfig's fields that are settings (all but ``origins``)."""
    return tuple(f for f in fields(ServerConfig) if f.metadata.get("setting", True))


def _where(source: str, name: str, file: Path | None) -> str:
    if source == "flag":
        return "--" + name.replace("_", "-")
    if source == "env":
        return ENV_PREFIX + name.upper()
    return f"{file}: {name}"


def load_config(
    *,
    file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge defaults < file < env < flags and validate. Flags set to None are ignored.

    ``file=None`` reads /etc/tsnetchat/config.toml only if it exists; an explicit file
    that does not exist is an error.
    """
    env = os.environ if env is None else env
    known = {f.name: f for f in settings()}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}

    named = ""  # (an error names the variable that named the file, as for any setting)
    if file is None and env.get(ENV_PREFIX + "CONFIG"):
        file = Path(env[ENV_PREFIX + "CONFIG"])
        named = f"{ENV_PREFIX}CONFIG: "
    if file is None and DEFAULT_CONFIG_FILE.exists():
        file = DEFAULT_CONFIG_FILE
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{named}config file {file} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"{named}config file {file} is a directory, not a file") from None
        except OSError as e:
            raise ConfigError(f"{named}cannot read the config file {file}: {e.strerror}"
                              ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{named}config file {file} is not text (TOML is UTF-8)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{named}config file {file} is not valid TOML: {e}") from None
        for k, v in data.items():
            if k not in known:
                # (the list of every key alone left `rate_brust` to be found among 60 names;
                # a reload refused for it said no more: an operator's run, 2026-11-25)
                near = [] if isinstance(v, dict) else difflib.get_close_matches(k, known, n=1)
                raise ConfigError(f"{file}: unknown key {k!r}: did you mean {near[0]!r}? (every "
                                  "key: README, Configuration)" if near else
                                  f"{file}: unknown key {k!r} (known: {', '.join(sorted(known))})")
            values[k] = _convert(k, v, known[k].type, _where("file", k, file))
            origin[k] = "file"
    for name, f in known.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _convert(name, raw, f.type, _where("env", name, file))
            origin[name] = "env"
    for name, raw in (flags or {}).items():
        if raw is None:
            continue
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _convert(name, raw, known[name].type, _where("flag", name, file))
        origin[name] = "flag"

    cfg = ServerConfig(**values, origins={n: _where(o, n, file) for n, o in origin.items()},
                       file=Path(file) if file is not None else None)
    _validate(cfg, cfg.where)
    return cfg


def _validate(cfg: ServerConfig, where: Callable[[str], str]) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{where(name)}: {why}")

    if str(cfg.state_dir).strip() in ("", "."):
        # (An empty value is the current directory, which the server would make private.)
        raise bad("state_dir", "must name a directory, e.g. /var/lib/tsnetchat (empty would "
                               "mean the current directory)")
    if not 1 <= cfg.port <= 65535:
        raise bad("port", f"{cfg.port} is not a TCP port (1-65535)")
    for f in settings():  # (a path with one made `serve` and `doctor` end in a traceback)
        if isinstance(getattr(cfg, f.name), str | Path) and "\x00" in str(getattr(cfg, f.name)):
            raise bad(f.name, "contains a NUL character")
    if cfg.listen != "auto":
        for a in parse_listen(cfg.listen, where("listen")):
            ip = ipaddress.ip_address(a)
            # (::ffff:0.0.0.0, IPv4's "any" written as IPv6, listened on every interface)
            mapped = getattr(ip, "ipv4_mapped", None)
            if ip.is_unspecified or (mapped is not None and mapped.is_unspecified):
                raise bad("listen", f"{a} would listen on every interface; tsnetchat listens "
                                    "only where tailnet traffic arrives")
    for name in ("max_message_bytes", "max_page", "rate_burst", "max_rooms_per_client",
                 "subscriber_queue", "call_burst", "edits_per_minute", "max_topic_bytes",
                 "search_max_query_bytes", "searches_per_minute", "max_search_page",
                 "history_kib_per_second"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be at least 1")
    if cfg.max_message_bytes > 60_000:
        raise bad("max_message_bytes", "must be at most 60000 (gRPC frames are capped at 64 KiB)")
    for name in ("rate_per_second", "call_rate", "startup_timeout", "whois_timeout",
                 "recheck_interval", "token_ttl_hours", "enroll_ttl_hours",
                 "store_wait"):
        if not getattr(cfg, name) > 0:
            raise bad(name, "must be greater than 0")
    # (whois_timeout = 1e-9 started a server that refused every call as tailscaled not
    # answering; a tenth of a second is already less than a busy tailscaled may need: an
    # operator's run, 2026-11-23)
    for name in ("startup_timeout", "whois_timeout", "recheck_interval", "store_wait",
                 "cluster_wait"):
        if 0 < getattr(cfg, name) < MIN_SECONDS:
            raise bad(name, f"must be at least {MIN_SECONDS} seconds")
    for f in settings():
        top = MAX_OF.get(f.name, MAX_NUMBER)
        if f.type in ("int", "float") and getattr(cfg, f.name) > top:
            raise bad(f.name, f"must be at most {top:,}")
    if cfg.max_dm_members < 2:
        raise bad("max_dm_members", "must be at least 2")
    for name in ("history_on_join", "retention_count", "retention_days", "shutdown_grace",
                 "edit_window_seconds", "max_connections_per_device"):
        if getattr(cfg, name) < 0:
            raise bad(name, "must not be negative")
    if not re.fullmatch(r"[a-z0-9.-]+\.[a-z]{2,}", cfg.cap_domain):
        raise bad("cap_domain", f"{cfg.cap_domain!r} is not a domain name like example.com")
    if cfg.enroll not in CHOICES["enroll"]:
        raise bad("enroll", f"{cfg.enroll!r} is not one of off, grant, any")
    if cfg.log_level.lower() not in CHOICES["log_level"]:
        raise bad("log_level", "must be debug, info, warning or error")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", cfg.hostname):
        raise bad("hostname", "must be a DNS label (a-z, 0-9, -)")
    for tag in cfg.tag_list:
        if not TAG_RE.fullmatch(tag):
            raise bad("tags", f"{tag!r} is not a tag like tag:chat")
    if not cfg.api_url.startswith("https://"):
        raise bad("api_url", "must be an https:// URL (the API is only spoken over TLS)")
    if cfg.stale_device not in CHOICES["stale_device"]:
        raise bad("stale_device", "must be remove or report")
    if cfg.cluster.strip() and not cfg.cluster_urls:  # (",,," spun at 95% CPU, silent)
        raise bad("cluster", "lists no NATS URL (e.g. nats://nats1.example:4222,...)")
    for url in cfg.cluster_urls:
        if re.fullmatch(r"(nats|tls)://[^/@\s]+@\S*", url):
            # (a password or token there was shown by `config show` and logged at every
            # start: an operator's run, 2026-11-24)
            raise bad("cluster", "a NATS URL carries no user, password or token (`config "
                                 "show` and the log would show them): give them as nats_user "
                                 "and nats_password, or in nats_credentials")
        if not re.fullmatch(r"(nats|tls)://[^/@\s:]+(:\d{1,5})?/?", url):
            raise bad("cluster", f"{url!r} is not a NATS URL like nats://nats1.example:4222")
    if cfg.cluster_wait <= 0:
        raise bad("cluster_wait", "must be greater than 0")
    if cfg.cluster_replicas not in (1, 3, 5):
        raise bad("cluster_replicas", "must be 1, 3 or 5 (a quorum of an odd number of copies)")
    if cfg.metrics_port and not 1 <= cfg.metrics_port <= 65535:  # (it said "other than
        raise bad("metrics_port", f"{cfg.metrics_port} is not a TCP port (1-65535)")  # --port")
    if cfg.metrics_port and cfg.metrics_port == cfg.port:
        # (it said "other than --port" of a port no flag had given: a newcomer's config,
        # 2026-11-25)
        raise bad("metrics_port", f"must differ from the server's own port ({where('port')} "
                                  f"= {cfg.port})")


def parse_listen(value: str, where: str = "listen") -> list[str]:
    out = []
    for part in value.split(","):
        part = part.strip().strip("[]")
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise ConfigError(f"{where}: {part!r} is not an IP address") from None
    if not out:
        raise ConfigError(f"{where}: no addresses given")
    return out
