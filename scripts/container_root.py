#!/usr/bin/env python3
"""A Debian root that boots a real systemd in systemd-nspawn, built once and cached.

Test infrastructure, not part of the shipped package. The systemd tests
(tests/test_systemd_units.py) boot this root with systemd as PID 1 and install tsnetchat
into it the way the README tells an operator to.

The root is made by ``debootstrap`` from Debian's own packages (the mirror apt is already
configured with) into ``~/.cache/tsnetchat/nspawn/<suite>-<recipe hash>/root``, outside the
git tree, and rebuilt only when the recipe below changes. The cached root is never written
to: the tests boot it with ``--volatile=overlay`` (a tmpfs over a read-only root).

Command line::

    python scripts/container_root.py build     # build or reuse; prints the root's path
    python scripts/container_root.py path      # the path it would have (built or not)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tailnet_lab import cache_root  # one place decides where test caches live (scripts/)

# --- the recipe: any change here builds a new root ---------------------------------------

SUITE = "bookworm"
# systemd as PID 1 (systemd-sysv), dbus for systemctl's bus, python3-venv and pipx for the
# documented install methods, python3-pip for the one refused (pip install --user), procps
# for the tests' process checks.
PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-pip", "pipx",
            "procps"]
# Units that only make sense on a machine with hardware or a console, masked so that a boot
# ends "running", not "degraded", when nothing of ours failed.
MASKED = ["console-getty.service", "getty@.service", "systemd-timesyncd.service",
          "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
          "fstrim.timer"]
RECIPE_VERSION = 1  # bump when the post-debootstrap steps below change


def recipe() -> dict[str, object]:
    return {"suite": SUITE, "variant": "minbase", "packages": PACKAGES, "masked": MASKED,
            "version": RECIPE_VERSION}


class RootError(RuntimeError):
    """The root could not be built; the message says what to do."""


def log(msg: str) -> None:
    print(f"[container-root] {msg}", file=sys.stderr, flush=True)


def cache_base() -> Path:
    return cache_root() / "nspawn"


def root_dir() -> Path:
    digest = hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_base() / f"{SUITE}-{digest}"


def find_root() -> Path | None:
    """The cached root for the current recipe, or None if it was never built."""
    d = root_dir()
    return d / "root" if (d / "complete").is_file() else None


def apt_mirror() -> str:
    """The Debian mirror apt on this machine already uses (so a build needs no new access)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob(
        "*.sources")), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for p in candidates:
        with contextlib.suppress(OSError):
            text = p.read_text()
            # deb822 (URIs: ...) or one-line (deb URL suite ...); the main archive, not security.
            for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.M):
                url = m.group(1)
                if url.startswith("http") and "security" not in url:
                    return url
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    cache_base().mkdir(parents=True, exist_ok=True)
    with open(cache_base() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a parallel run builds the same root: wait for it
        yield


def _run(argv: list[str], *, what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RootError(f"{what} failed ({proc.returncode}):\n"
                        f"{(proc.stderr or proc.stdout)[-4000:]}")


def ensure_root() -> Path:
    """Build the root if the current recipe has none yet (minutes); return its path."""
    found = find_root()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise RootError("building the container root needs root (debootstrap); run "
                        "`make setup` as root")
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.access(debootstrap, os.X_OK):
        raise RootError("debootstrap is not installed: scripts/install-sysdeps.sh installs it")
    with _locked():
        found = find_root()
        if found is not None:
            return found
        target = root_dir()
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        work = Path(tempfile.mkdtemp(prefix="root.", dir=target))
        mirror = apt_mirror()
        log(f"building a Debian {SUITE} root for the systemd tests from {mirror} "
            "(first time takes minutes) ...")
        started = time.monotonic()
        _run([debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
              str(work), mirror], what="debootstrap")
        _post_install(work)
        work.rename(target / "root")
        (target / "recipe.json").write_text(json.dumps(recipe(), indent=2))
        (target / "complete").write_text(f"{time.monotonic() - started:.0f}s\n")
        log(f"built in {time.monotonic() - started:.0f}s -> {target / 'root'}")
        _prune_other_roots(target)
        return target / "root"


def _post_install(root: Path) -> None:
    for unit in MASKED:
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")
    # A machine id is made at each boot (the root is read-only under the overlay).
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("tsnetchat-vm\n")
    # Clean apt's downloads; they are half the root's size.
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


def _prune_other_roots(keep: Path) -> None:
    for d in cache_base().glob(f"{SUITE}-*"):
        if d != keep and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("cmd", choices=["build", "path"])
    args = p.parse_args(argv)
    if args.cmd == "path":
        print(root_dir() / "root")
        return 0
    try:
        print(ensure_root())
    except RootError as e:
        print(f"container root error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
