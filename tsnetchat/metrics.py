"""Counters an operator can read: `tsnetchat doctor`, the log, or Prometheus text format.

A plain dict of monotonically increasing counters plus gauges computed on demand; nothing
here blocks or allocates per message beyond a dict update.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


class Metrics:
    def __init__(self) -> None:
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = fn

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.counters)
        out.update({k: fn() for k, fn in self.gauges.items()})
        return out

    def render_prometheus(self) -> str:
        lines = []
        seen: set[str] = set()
        for name, value in sorted(self.snapshot().items()):
            base = name.split("{", 1)[0]
            if base not in seen:
                seen.add(base)
                kind = "counter" if base.endswith("_total") else "gauge"
                lines.append(f"# TYPE tsnetchat_{base} {kind}")
            lines.append(f"tsnetchat_{name} {value:g}")
        return "\n".join(lines) + "\n"
