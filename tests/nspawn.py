"""A real systemd as PID 1: the cached Debian root (scripts/container_root.py) booted with
systemd-nspawn, for the systemd tests.

Why these flags (2026-11-22, this machine: host PID 1 is not systemd, cgroups are hybrid):

* ``--register=no --keep-unit``: without a systemd on the host there is no machined and no
  bus to register with; plain ``--boot`` fails with "Failed to open system bus".
* ``--volatile=overlay``: the cached root stays read-only under a tmpfs, so every boot starts
  from the same clean machine and the cache is never written to.
* ``--console=pipe``: no terminal; the container's console goes to a log file.
* the host's network is shared (no ``--private-network``): the lab's headscale and DERP on
  127.0.0.1 are reachable from the container as they are from every other lab node.

Processes: nspawn gets ``PR_SET_PDEATHSIG=SIGTERM`` through ``setpriv`` (a killed pytest
still halts the container); ``stop`` sends SIGTERM (nspawn halts the container), and if
that does not end it in time, SIGKILLs nspawn and the container's PID 1 (which ends its
whole PID namespace: a SIGKILLed nspawn alone leaves the container running). PID 1
carries TSNETCHAT_RUN_ID so scripts/no-leftovers.sh finds a container left behind.

Commands run inside with ``nsenter --all`` into PID 1's namespaces, with a clean
environment, as an operator's root shell on the machine would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import container_root  # noqa: E402
from tailnet_lab import Running  # noqa: E402

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the README's install lines install (with the extras they name), quoted for sh.
EXTRAS = "server,api"
PKG = f"'tsnetchat[{EXTRAS}]'"
WHEELHOUSE = "/srv/wheelhouse"
# pip inside the machine installs from the wheelhouse only: the wheel built from this
# checkout and its dependencies (what PyPI would serve), like a site's offline mirror.
PIP_CONF = f"[global]\nno-index = true\nfind-links = {WHEELHOUSE}\n"


class ContainerError(RuntimeError):
    pass


def missing() -> str:
    """Why a container cannot be booted here ("" if it can)."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (scripts/install-sysdeps.sh installs it)"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is not installed"
    return ""


def build_wheelhouse(dest: Path) -> Path:
    """This checkout's wheel (with the README's extras) and every dependency, plus pip, setuptools
    and wheel (pipx upgrades its shared venv with them)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(dest),
         f"{ROOT}[{EXTRAS}]", "pip", "setuptools", "wheel"],
        capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise ContainerError(f"building the wheelhouse failed:\n{proc.stderr[-3000:]}")
    return dest


class Container(Running):
    """One boot of the cached root. Use as a context manager; ``stop`` is idempotent."""

    def __init__(self, root: Path, log: Path, *, binds: list[tuple[Path, str]]) -> None:
        self.root = root
        self.log = log
        self.binds = binds
        self.name = f"tsnetchat-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def start(self, timeout: float = 90) -> None:
        # PR_SET_PDEATHSIG through setpriv, not a preexec_fn: Python code between fork and
        # exec in this process (gRPC's threads and fork handlers live here) once aborted the
        # child (2026-11-22, "epoll_wait error: Bad file descriptor", SIGABRT).
        argv = ["setpriv", "--pdeathsig", "SIGTERM", "--",
                "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(self.root),
                "--boot", "--console=pipe", "--volatile=overlay", f"--machine={self.name}",
                "--resolv-conf=off", "--timezone=off",
                f"--setenv=TSNETCHAT_RUN_ID={os.environ.get('TSNETCHAT_RUN_ID', '')}"]
        argv += [f"--bind-ro={src}:{dst}" for src, dst in self.binds]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.init_pid:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                     f"{self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise ContainerError("the container's PID 1 did not appear")
            self.init_pid = self._find_init()
            time.sleep(0.05)
        while True:
            out = self.sh("systemctl is-system-running --wait", check=False, timeout=timeout)
            state = out.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise ContainerError(f"the container did not finish booting: {state}")
            time.sleep(0.2)
        if state == "degraded":
            failed = self.sh("systemctl --failed --no-legend", check=False).stdout
            raise ContainerError(f"the container booted degraded:\n{failed}")
        self.write("/etc/pip.conf", PIP_CONF)

    def _find_init(self) -> int:
        assert self.proc is not None
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            for child in children.split():
                status = Path(f"/proc/{child}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
                if nspid.split()[-1] == "1":
                    return int(child)
        return 0

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks PID 1 to halt
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)  # ends the container's PID namespace
            self.init_pid = 0

    # inside --------------------------------------------------------------------------

    def sh(self, script: str, *, check: bool = True, timeout: float = 180,
           user: str = "root") -> subprocess.CompletedProcess[str]:
        """Run a shell script inside, as root (or ``user``) with a login-like environment."""
        if not self.init_pid:
            raise ContainerError("the container is not running")
        home = "/root" if user == "root" else f"/home/{user}"
        env = ["env", "-i", f"PATH={PATH}", f"HOME={home}", "LANG=C.UTF-8", f"USER={user}"]
        prefix = [] if user == "root" else ["setpriv", f"--reuid={user}", f"--regid={user}",
                                             "--init-groups"]
        argv = ["nsenter", "-t", str(self.init_pid), "--all", "--wdns=/", *env, *prefix,
                "/bin/sh", "-c", script]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ContainerError(f"in the container, `{script}` failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside (through the container's own root, not the cached one)."""
        host = Path(f"/proc/{self.init_pid}/root") / path.lstrip("/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(text)
        host.chmod(mode)

    def read(self, path: str) -> str:
        return (Path(f"/proc/{self.init_pid}/root") / path.lstrip("/")).read_text()

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@contextlib.contextmanager
def booted(log: Path, binds: list[tuple[Path, str]]) -> Iterator[Container]:
    """Build (or reuse) the root and boot it; halt it on any exit."""
    root = container_root.ensure_root()
    with Container(root, log, binds=binds) as c:
        yield c


# --- the machine as the systemd tests use it ----------------------------------------------

# Modelled on the unit in Tailscale's Debian package (Type=notify, state and runtime dirs),
# running the lab's tailscaled in userspace-networking mode with the lab's knobs (no
# contact with anything public). EnvironmentFile= as in the package.
TAILSCALED_UNIT = """\
[Unit]
Description=Tailscale node agent (the lab's tailscaled)
Wants=network-pre.target
After=network-pre.target

[Service]
EnvironmentFile=/etc/default/tailscaled
ExecStart=/usr/local/sbin/tailscaled --state=/var/lib/tailscale/tailscaled.state \
--socket=/run/tailscale/tailscaled.sock --port=0 $FLAGS
Restart=on-failure
RuntimeDirectory=tailscale
RuntimeDirectoryMode=0755
StateDirectory=tailscale
StateDirectoryMode=0700
Type=notify

[Install]
WantedBy=multi-user.target
"""
LAB_KNOBS = ("TS_NO_LOGS_NO_SUPPORT=true TS_ASSUME_NETWORK_UP_FOR_TEST=1 TS_DISABLE_PORTMAPPER=1 "
             "TS_PANIC_IF_HIT_MAIN_CONTROL=1 TS_DEBUG_USE_DERP_HTTP=1")
TAILSCALED_DEFAULTS = "FLAGS=--tun=userspace-networking\n" + "\n".join(LAB_KNOBS.split()) + "\n"

_wheelhouse: list[Path] = []


def wheelhouse(tmp: Path) -> Path:
    """The wheelhouse, built once per test run."""
    if not _wheelhouse:
        _wheelhouse.append(build_wheelhouse(tmp / "wheelhouse"))
    return _wheelhouse[0]


@contextlib.contextmanager
def lab_machine(lab: Any, tmp: Path) -> Iterator[Container]:
    """A booted machine with the wheelhouse at /srv/wheelhouse and the lab's tailscale
    binaries where Tailscale's packages put them (/usr/local here)."""
    bins = lab.bin
    binds = [(wheelhouse(tmp), WHEELHOUSE), (bins.tailscaled, "/usr/local/sbin/tailscaled"),
             (bins.tailscale, "/usr/local/bin/tailscale")]
    with booted(tmp / "console.log", binds) as c:
        yield c


def join_system_tailscaled(c: Container, lab: Any, hostname: str) -> None:
    """tailscaled.service on the machine, joined to the lab as the user chat."""
    c.write("/etc/systemd/system/tailscaled.service", TAILSCALED_UNIT)
    c.write("/etc/default/tailscaled", TAILSCALED_DEFAULTS)
    c.sh("systemctl daemon-reload && systemctl enable --now tailscaled.service")
    key = lab.auth_key("chat")
    c.sh(f"tailscale up --login-server={lab.headscale_url} "
         f"--auth-key={key} --hostname={hostname} --timeout=60s")


def forget_node(lab: Any, hostname: str) -> None:
    """Delete the lab's record of a machine's node, so later tests see only the lab's own."""
    nodes = json.loads(lab.headscale("nodes", "list", "-o", "json"))
    for n in nodes or []:
        if n.get("given_name") == hostname or n.get("name") == hostname:
            lab.headscale("nodes", "delete", "-i", str(n["id"]), "--force")
