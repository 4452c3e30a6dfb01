"""The systemd units shipped inside the package, and installing them.

``install_unit`` writes a unit whose ExecStart is this installation's ``tsnetchat``. The
units run as a ``DynamicUser=`` with ``ProtectHome=yes``, so an installation under a home
directory (a venv in /home or /root, or pipx's default for root, ``~/.local/pipx``) is
invisible to the service and fails with 203/EXEC. ``find_installation`` works out which
directories the service must see; when some are under a home, the unit hides the homes
behind an empty tmpfs and shows only those directories, read-only (``ProtectHome=tmpfs`` +
``BindReadOnlyPaths=``). An installation a service cannot use at all (``pip install
--user``, or files other users may not read) is refused with a ConfigError that says how to
install instead.
"""

from __future__ import annotations

import os
import shutil
import site
import stat
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ConfigError

UNITS = {False: "tsnetchat.service", True: "tsnetchat-embedded.service"}
# The file the embedded unit hands its server as the credential `authkey` (LoadCredential=).
AUTHKEY = Path("/etc/tsnetchat/authkey")
# What ProtectHome=yes hides from the service.
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
# What PrivateTmp=yes replaces with empty directories of the service's own.
TMP_ROOTS = (Path("/tmp"), Path("/var/tmp"))
# The install the README recommends, named in every refusal.
VENV_FIX = ("install it where a service can run it: sudo python3 -m venv /opt/tsnetchat && "
            "sudo /opt/tsnetchat/bin/pip install '/path/to/tsnetchat[server]' (your checkout, "
            "or the wheel; README, Install), then run "
            "sudo /opt/tsnetchat/bin/tsnetchat install-systemd")


def unit_text(embedded: bool = False) -> str:
    return (resources.files("tsnetchat") / "systemd" / UNITS[embedded]).read_text()


@dataclass(frozen=True)
class Installation:
    """Where this tsnetchat lives, as a service must see it.

    ``exe`` is the script ExecStart runs; ``binds`` are directories under a home directory
    the service must see (read-only); empty when nothing is under a home. ``in_tmp``: the
    first of the script, the package (an editable install's checkout) and the
    installation's prefixes under /tmp or /var/tmp, which the service cannot see (a
    checkout there is fine to test with, so it is said, not refused).
    """

    exe: Path
    binds: tuple[Path, ...] = ()
    in_tmp: Path | None = None


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _home_root(path: Path) -> Path | None:
    return next((r for r in HOME_ROOTS if _under(path, r)), None)


def _others_may_use(path: Path, *, start: Path, execute: bool) -> str:
    """"" if users other than the owner may reach ``path`` from ``start`` (every directory
    on the way searchable) and read it (and run it, with ``execute``); else the first path
    that stops them. A DynamicUser= service is such an other user."""
    rel = path.relative_to(start)
    current = start
    for part in ("", *rel.parts):
        current = current / part if part else current
        try:
            mode = current.stat().st_mode
        except OSError:
            return str(current)
        if stat.S_ISDIR(mode):
            if not mode & stat.S_IXOTH:
                return str(current)
        elif not mode & stat.S_IROTH or (execute and not mode & stat.S_IXOTH):
            return str(current)
    return ""


def find_installation(exe: str | None = None) -> Installation:
    """This installation as a service sees it; ConfigError (with the fix) if it cannot run it.

    ``exe`` overrides the script to run (tests); by default it is the ``tsnetchat`` next to
    the running interpreter (a venv or pipx), else the one on PATH.
    """
    package = Path(__file__).resolve().parent
    user_site = Path(site.getusersitepackages()) if site.ENABLE_USER_SITE else None
    if user_site is not None and _under(package, user_site):
        raise ConfigError(f"install-systemd: tsnetchat is installed with `pip install --user` "
                          f"({user_site}), which a service cannot use; {VENV_FIX}")
    if exe is None:
        beside = Path(os.path.abspath(sys.executable)).with_name("tsnetchat")
        found = str(beside) if beside.is_file() else shutil.which("tsnetchat")
        if found is None:
            raise ConfigError("install-systemd: cannot find the tsnetchat command of this "
                              f"installation; {VENV_FIX}")
        exe = found
    script = Path(os.path.abspath(exe))
    # Everything the service reads: the installation (a venv, or the system's prefix) and the
    # Python it runs on (a venv links to it; pyenv puts it under a home too).
    roots = {Path(sys.prefix), Path(sys.base_prefix)}
    binds = tuple(sorted(r for r in roots if _home_root(r) is not None))
    if _home_root(script) is not None and not any(_under(script, b) for b in binds):
        # ~/.local/bin/tsnetchat is pipx's link into its venv; ExecStart needs the target.
        target = script.resolve()
        if not any(_under(target, b) for b in binds):
            raise ConfigError(f"install-systemd: {script} is in a home directory, outside the "
                              f"installation a service can be shown; {VENV_FIX}")
        script = target
    for path, execute in ((script, True), (package / "__init__.py", False),
                          (Path(sys.executable).resolve(), True)):
        start = next((b for b in binds if _under(path, b)), Path("/"))
        stop = _others_may_use(path, start=start, execute=execute)
        if stop:
            raise ConfigError(f"install-systemd: a service runs as a user of its own, which "
                              f"may not read {stop}: make the installation readable by others "
                              f"(chmod -R o+rX), or {VENV_FIX}")
    in_tmp = next((p for p in (script, package, Path(sys.prefix), Path(sys.base_prefix))
                   if any(_under(p, t) or _under(p.resolve(), t) for t in TMP_ROOTS)), None)
    return Installation(exe=script, binds=binds, in_tmp=in_tmp)


def render_unit(inst: Installation, *, embedded: bool = False) -> str:
    """The unit text for this installation."""
    text = unit_text(embedded).replace("/usr/local/bin/tsnetchat", _quote(str(inst.exe)))
    if inst.binds:
        shown = " ".join(_quote(str(b)) for b in inst.binds)
        text = text.replace(
            "ProtectHome=yes\n",
            "# install-systemd: tsnetchat is installed under a home directory; the homes stay\n"
            "# hidden behind an empty tmpfs and only its installation is shown, read-only.\n"
            f"ProtectHome=tmpfs\nBindReadOnlyPaths={shown}\n")
    return text


def _quote(path: str) -> str:
    return f'"{path}"' if any(c.isspace() for c in path) else path


def install_unit(dest: Path, *, embedded: bool = False, exe: str | None = None
                 ) -> tuple[Path, str]:
    """Write the unit to ``dest`` with ExecStart pointing at this installation's tsnetchat;
    its path, and a warning ("" if none) for an installation under /tmp.

    Raises ConfigError (saying how to install instead) for an installation a service cannot
    run, and for a ``dest`` that is not an existing directory (nothing is made)."""
    inst = find_installation(exe)
    text = render_unit(inst, embedded=embedded)
    warning = "" if inst.in_tmp is None else (
        f"this installation ({inst.in_tmp}) is under a temporary directory, which the unit's "
        f"PrivateTmp=yes replaces with an empty one: the service will not start (status "
        f"203/EXEC); {VENV_FIX}")
    path = dest / UNITS[embedded]
    if not dest.is_dir():
        # (It made the directory: `--dest /etc/systemd/sytem` installed a unit systemd never
        # reads, and said "installed" and "next: systemctl enable": the left-over of two
        # operators' runs, 2026-11-25.)
        what = "is not a directory" if os.path.lexists(dest) else "does not exist"
        raise ConfigError(f"install-systemd: {dest} {what}; nothing was written. systemd reads "
                          "units from /etc/systemd/system (the default): leave --dest out, "
                          "or make the directory first")
    try:
        path.write_text(text)
    except OSError as e:
        hint = " (as root: sudo tsnetchat install-systemd)" if os.geteuid() != 0 else ""
        raise ConfigError(f"install-systemd: cannot write {path}: {e.strerror}{hint}") from None
    return path, warning
