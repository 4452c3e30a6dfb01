"""What a deletion costs the writer thread over a large history (issue 15): on a copy of
bench/search.py's database, delete one message as the server does (Store.write of a DELETE
event) and time that, then the purge (Store.purge: the search index merged anew, the WAL
checkpointed and truncated), during which nothing else is written. A benchmark, never a
timed test.

    .venv/bin/python bench/search.py --dir /tmp/tsnetchat-search --runs 1   # builds the db
    .venv/bin/python bench/delete.py --dir /tmp/tsnetchat-search --runs 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tsnetchat.store import DELETE, Draft, Sender, Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/tsnetchat-search")
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    src = Path(a.dir) / f"search-{a.messages}.db"
    if not src.exists():
        raise SystemExit(f"{src} is missing: run bench/search.py --dir {a.dir} first")
    deletes, purges = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(a.runs):
            db = Path(tmp) / f"copy{run}.db"
            shutil.copy(src, db)
            s = Store(db)
            row = s._db.execute("SELECT r.name, m.id, x.login, x.display_name, x.node "
                                "FROM messages m JOIN rooms r ON r.id = m.room JOIN senders x "
                                "ON x.id = m.sender WHERE m.seq = ?",
                                (a.messages // 2,)).fetchone()
            t0 = time.perf_counter()
            s.write([Draft(row[0], Sender(row[2], row[3], row[4]), DELETE, "", "",
                           target=row[1])])
            deletes.append((time.perf_counter() - t0) * 1000)
            assert s.purge_due
            t0 = time.perf_counter()
            s.purge()
            purges.append((time.perf_counter() - t0) * 1000)
            s.close()
            db.unlink()
    print(f"{a.messages} messages: delete {statistics.median(deletes):.1f} ms, purge "
          f"{statistics.median(purges):.0f} ms (medians of {a.runs}; purges "
          f"{', '.join(f'{p:.0f}' for p in purges)} ms)")


if __name__ == "__main__":
    main()
