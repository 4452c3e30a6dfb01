"""systemd's notify protocol (READY=1, STOPPING=1, WATCHDOG=1, STATUS=...).

It is one datagram to $NOTIFY_SOCKET; we write it here rather than depend on the `sdnotify`
package (unmaintained since 2017) or libsystemd bindings (a C build). Without NOTIFY_SOCKET
every call is a no-op, so the server behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines; returns False when there is no socket or sending failed."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall("\n".join(fields).encode())
            return True
        except OSError:
            return False

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC in seconds, if systemd asked for a watchdog for this pid."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000
