"""`serve --embedded`: our own tailscaled in userspace-networking mode, supervised.

It gets its own state dir, LocalAPI socket and hostname under the server's state dir, joins
with an auth key (env TSNETCHAT_AUTH_KEY, --auth-key-file, or a systemd credential named
`authkey`), is restarted with backoff if it dies, and is stopped when the server stops.
The auth key never appears on a command line: it is passed as `--auth-key=file:...`.

With Tailscale API credentials (an OAuth client, whose secret may sit where the auth key
would), a node that needs to log in gets a freshly minted key instead (provision.py), and on
a fresh state dir the stale device still holding its name is removed or reported first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil

from .config import ServerConfig
from .errors import ConfigError, TailnetError
from .tailnet import LocalAPI
from .tsapi import CLIENT_SECRET_PREFIX

log = logging.getLogger("tsnetchat.embedded")


# More than any auth key or OAuth client secret (about 60-80 characters): a file longer
# than this is not one, and is not read whole (`--auth-key-file /dev/zero` read for ever).
MAX_KEY_BYTES = 4096


def find_auth_key(cfg: ServerConfig) -> str:
    """The auth key from config/env, a file, or $CREDENTIALS_DIRECTORY/authkey ("" if none).
    Raises ConfigError naming the setting when the file given cannot be read or holds no
    key: empty, not text, more than one word. (A file not UTF-8 ended in "unexpected
    UnicodeDecodeError ... a bug", and an empty one was said to be "no auth key was given":
    an operator's run, 2026-11-25.)"""
    if cfg.auth_key:
        return cfg.auth_key.strip()
    candidates = [cfg.auth_key_file] if cfg.auth_key_file else []
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(os.path.join(os.environ["CREDENTIALS_DIRECTORY"], "authkey"))
    for c in candidates:
        where = (cfg.where("auth_key_file") if c == cfg.auth_key_file else
                 "the systemd credential 'authkey'")
        try:
            with open(c, "rb") as f:
                raw = f.read(MAX_KEY_BYTES + 1)
        except OSError as e:
            if c == cfg.auth_key_file:
                raise ConfigError(f"{where}: {c}: {e.strerror}") from None
            continue
        try:
            key = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            key = None
        if key is None or len(raw) > MAX_KEY_BYTES or len(key.split()) > 1:
            raise ConfigError(f"{where}: {c} does not hold an auth key (one word, "
                              "tskey-auth-..., or an OAuth client's secret)")
        if not key:
            raise ConfigError(f"{where}: {c} is empty: put the auth key (tskey-auth-...), or "
                              "an OAuth client's secret, in it")
        return key
    return ""


def _which(name: str) -> str:
    found = shutil.which(name) if "/" not in name else (name if os.access(name, os.X_OK) else None)
    if not found:
        raise ConfigError(f"cannot find {name!r}; install Tailscale or pass --tailscaled-path")
    return found


def _dies_with_us() -> list[str]:
    """A prefix that makes the kernel stop tailscaled when this process dies, also by
    SIGKILL (PR_SET_PDEATHSIG, through util-linux's setpriv; not a ``preexec_fn``, which is
    unsafe beside gRPC's threads). Killed with -9, `serve --embedded` left its tailscaled
    running, holding the node's name and state dir for the next start (an operator's run,
    2026-11-24). Not under systemd (``INVOCATION_ID``), which stops the unit's cgroup whole
    (and whose shipped unit's system call filter was not tried with setpriv). Without
    setpriv, nothing (and stopping on exit is left to ``stop``)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv and not os.environ.get(
        "INVOCATION_ID") else []


class EmbeddedTailscaled:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.embedded_dir
        self.socket = cfg.effective_socket()
        self.tailscaled = _which(cfg.tailscaled_path)
        cli = os.path.join(os.path.dirname(self.tailscaled), "tailscale")
        self.tailscale = cli if os.access(cli, os.X_OK) else _which("tailscale")
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        # No state yet: this node has never joined, and its name may be held by an old one.
        self.fresh = not (self.dir / "tailscaled.state").exists()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                               "WATCHDOG_PID")}
        env.setdefault("TS_LOGS_DIR", str(self.dir / "logs"))
        return env

    async def _spawn(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        # Opening a local log file and polling for the socket are brief, bounded start-up work.
        logf = open(self.dir / "tailscaled.log", "ab")  # noqa: SIM115, ASYNC230
        self.proc = await asyncio.create_subprocess_exec(
            *_dies_with_us(), self.tailscaled, "--tun=userspace-networking",
            f"--statedir={self.dir}", f"--socket={self.socket}", "--port=0",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=logf, stderr=logf, env=self._env())
        logf.close()
        for _ in range(200):
            if os.path.exists(self.socket):  # noqa: ASYNC240
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise TailnetError(f"embedded tailscaled did not start; see {self.dir}/tailscaled.log")

    async def _up(self) -> None:
        api = LocalAPI(self.socket)
        try:
            st = await api.status()
        finally:
            await api.aclose()
        if st.running:
            return
        key = find_auth_key(self.cfg)
        from .provision import api_configured

        minting = not key or key.startswith(CLIENT_SECRET_PREFIX)
        if api_configured(self.cfg) and (self.fresh or minting):
            from .provision import provision, say_holders

            minted, holders = await provision(self.cfg, self.cfg.hostname, fresh=self.fresh,
                                              mint=minting)
            say_holders(holders, self.cfg.hostname)
            key = minted or key
        if not key and st.backend_state == "NeedsLogin":
            raise ConfigError("the embedded node is not logged in and no auth key was given: set "
                              "TSNETCHAT_AUTH_KEY, --auth-key-file, or the systemd credential "
                              "'authkey', or give an OAuth client (oauth_client_id) to mint one")
        args = [self.tailscale, f"--socket={self.socket}", "up", f"--hostname={self.cfg.hostname}",
                "--timeout=60s"]
        keyfile = self.dir / "authkey"
        if key:
            fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key)
            args.append(f"--auth-key=file:{keyfile}")
        if self.cfg.login_server:
            args.append(f"--login-server={self.cfg.login_server}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env=self._env())
            out, _ = await proc.communicate()
        finally:
            with contextlib.suppress(FileNotFoundError):
                keyfile.unlink()
        if proc.returncode != 0:
            raise TailnetError(f"`tailscale up` for the embedded node failed: "
                               f"{out.decode(errors='replace').strip()[-500:]}")

    async def start(self) -> None:
        await self._spawn()
        await self._up()
        self._supervisor = asyncio.create_task(self._supervise())
        log.info("embedded tailscaled running (socket %s, hostname %s)", self.socket,
                 self.cfg.hostname)

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            assert self.proc is not None
            rc = await self.proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            log.warning("embedded tailscaled exited (%s); restarting in %.1fs", rc, backoff)
            await asyncio.sleep(backoff)
            try:
                await self._spawn()  # state dir keeps it logged in
                backoff = 0.5
            except TailnetError as e:
                log.error("%s", e)
                backoff = min(backoff * 2, 30)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
