#!/usr/bin/env python3
"""Two trees of tsnetchat, alternated in one session: the fan-out rows of `make bench`.

    git worktree add /tmp/before 114c436          # e.g. round 2 before issue 15
    .venv/bin/python bench/compare.py /tmp/before  # against this tree
    .venv/bin/python bench/compare.py /tmp/a /tmp/b --only latency_9_at_1000 --rounds 5

Each tree's own bench/run.py starts its own server (so each runs its own code) with one
load generator for both; the order alternates every round, and the medians are printed as
JSON with every run. Noise on a shared machine hits both trees alike; compare within a row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parents[1]
# name -> (subscribers, messages, rate; 0 = as fast as it goes)
SCENARIOS = {"saturation_100": (100, 10_000, 0), "latency_9_at_1000": (9, 3_000, 1000),
             "latency_100_at_1000": (100, 3_000, 1000), "saturation_1000": (1000, 5_000, 0),
             "saturation_10000": (10_000, 500, 0), "latency_1000_at_100": (1000, 500, 100)}
FIGURES = ("deliveries_per_s", "p50_ms", "p99_ms", "server_cpu_s")


def load(name: str, tree: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, tree / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("others", type=Path, nargs="+", help="the trees to compare this one with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=sorted(SCENARIOS), action="append",
                    help="run only this scenario (again for more)")
    a = ap.parse_args()
    scenarios = {s: SCENARIOS[s] for s in a.only or SCENARIOS}
    trees = {("other" if len(a.others) == 1 else str(t)): load(f"run_other{i}", t.resolve())
             for i, t in enumerate(a.others)}
    trees["this"] = load("run_this", HERE)
    generator = trees["this"].build_generator()
    for m in trees.values():
        m.GENERATOR[:] = generator
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {t: [] for t in trees} for s in scenarios}
    for rnd in range(a.rounds):
        order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
        for scenario, (n, count, rate) in scenarios.items():
            for t in order:
                r = trees[t].fanout("tsnetchat", n, count=count, rate=rate, sample=min(n, 100))
                runs[scenario][t].append({k: r.get(k) for k in FIGURES})
                print(scenario, t, runs[scenario][t][-1], file=sys.stderr, flush=True)
    medians = {s: {t: {k: statistics.median([r[k] for r in rs if r[k] is not None])
                       for k in FIGURES if any(r[k] is not None for r in rs)}
                   for t, rs in by_tree.items()} for s, by_tree in runs.items()}
    print(json.dumps({"medians": medians, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
