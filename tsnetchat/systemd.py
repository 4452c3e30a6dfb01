"""The systemd units shipped inside the package, and installing them."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

UNITS = {False: "tsnetchat.service", True: "tsnetchat-embedded.service"}


def unit_text(embedded: bool = False) -> str:
    return (resources.files("tsnetchat") / "systemd" / UNITS[embedded]).read_text()


def install_unit(dest: Path, *, embedded: bool = False, exe: str | None = None) -> Path:
    """Write the unit to ``dest`` with ExecStart pointing at this installation's tsnetchat."""
    exe = exe or shutil.which("tsnetchat") or str(Path(sys.executable).with_name("tsnetchat"))
    text = unit_text(embedded).replace("/usr/local/bin/tsnetchat", exe)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / UNITS[embedded]
    path.write_text(text)
    return path
