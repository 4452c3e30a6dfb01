"""`pip install tsnetchat` is the client alone: jwt, grpc_health and grpc_reflection belong
to `tsnetchat[server]`. Every module a client command runs must load without them
(`connect` and `doctor --server` did not: tui reached auth, and so jwt, through the server's
room rules and message path; a review, 2026-11-24). The lab test
test_login.py::test_the_client_runs_without_the_servers_dependencies runs the commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = ("import sys; [sys.modules.__setitem__(m, None) for m in ('jwt', 'grpc_health', "
         "'grpc_reflection')]; import importlib; ")
CLIENT_MODULES = ("cli", "tui", "doctor", "clientcmds", "client", "chatview", "commands",
                  "openrooms", "discovery", "tokens", "render", "outbox")


@pytest.mark.parametrize("module", CLIENT_MODULES)
def test_a_client_module_loads_without_the_servers_dependencies(module: str) -> None:
    out = subprocess.run([sys.executable, "-c", BLOCK + f"importlib.import_module("
                          f"'tsnetchat.{module}')"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_server_modules_do_need_them() -> None:  # (the block above does block)
    out = subprocess.run([sys.executable, "-c", BLOCK + "importlib.import_module("
                          "'tsnetchat.auth')"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "jwt" in out.stderr
