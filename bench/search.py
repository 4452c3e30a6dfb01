"""Search over a large history (issue 15): build a database of N messages (default
1,000,000, cached in the given directory), then time Store.search the way the server runs it
(a reader connection, FTS5, the rooms filter) for rare, common and prefix words and a CJK
word (read in the text, not the index), ranked and newest first, for a caller who reads
every room, one room of the 20, and only a room of 10 messages (the worst case: the index
is read back to the first match in that room). A benchmark, never a timed test.

    .venv/bin/python bench/search.py --dir /tmp/tsnetchat-search --messages 1000000
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import time
from pathlib import Path

from tsnetchat import store
from tsnetchat.store import Draft, Sender, Store


def build(path: Path, n: int, rooms: int) -> None:
    rng = random.Random(15)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(20_000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]  # Zipf-like, as chat words are
    senders = [Sender(f"user{i}@example.com", f"User {i}", f"node{i}") for i in range(50)]
    s = Store(path)
    t0 = time.monotonic()
    for start in range(0, n, 1000):
        words = rng.choices(vocab, weights, k=12 * 1000)
        s.write([Draft(f"room{rng.randrange(rooms)}", rng.choice(senders), 1,
                       " ".join(words[i * 12:(i + 1) * 12]), "")
                 for i in range(min(1000, n - start))])
    s.close()
    print(f"built {n} messages in {time.monotonic() - t0:.0f}s")


def add_small_room(path: Path, vocab: list[str]) -> None:
    """A room of 10 messages, each with the 10 most common words (added to a cached
    database built before this case existed)."""
    db = sqlite3.connect(path)
    done = db.execute("SELECT 1 FROM rooms WHERE name='small'").fetchone()
    db.close()
    if done:
        return
    s = Store(path)
    s.write([Draft("small", Sender("small@example.com", "Small", "node-s"), 1,
                   " ".join(vocab[:10])) for _ in range(10)])
    s.index_pending()
    s.close()


def add_sized_rooms(path: Path, vocab: list[str], sizes: list[int]) -> None:
    """Rooms of ``sizes`` messages (``size<N>``) of 12 Zipf-distributed words, each written
    spread over the history as a DM's would be: where store.SEARCH_BY_ROOM is decided."""
    db = sqlite3.connect(path)
    have = {r[0] for r in db.execute("SELECT name FROM rooms WHERE name LIKE 'size%'")}
    db.close()
    rng = random.Random(16)
    weights = [1 / (i + 1) for i in range(len(vocab))]
    s = Store(path)
    for n in sizes:
        if f"size{n}" not in have:
            s.write([Draft(f"size{n}", Sender("sized@example.com", "Sized", "node-z"), 1,
                           " ".join(rng.choices(vocab, weights, k=12))) for _ in range(n)])
    s.index_pending()  # (the server's writer does this within a second)
    s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/tsnetchat-search")
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--rooms", type=int, default=20)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sizes", default="",
                    help="also rooms of these many messages, e.g. 300,3000 (comma-separated)")
    ap.add_argument("--by-room", type=int, default=None,
                    help="store.SEARCH_BY_ROOM for this run (0: never message by message)")
    a = ap.parse_args()
    if a.by_room is not None:
        store.SEARCH_BY_ROOM = a.by_room
    path = Path(a.dir) / f"search-{a.messages}.db"
    if not path.exists():
        build(path, a.messages, a.rooms)
    # words by frequency, from the index itself
    vocab = sqlite3.connect(path)  # the server's readers are query_only; this one is not
    vocab.execute("CREATE VIRTUAL TABLE temp.v USING fts5vocab(main, messages_fts, row)")
    terms = [r[0] for r in vocab.execute("SELECT term FROM temp.v ORDER BY doc DESC")]
    vocab.close()
    add_small_room(path, terms)
    sizes = [int(x) for x in a.sizes.split(",") if x]
    add_sized_rooms(path, terms, sizes)
    st = Store(path, readonly=True)
    rooms = [f"room{i}" for i in range(a.rooms)]
    cases = {"common word (top 10)": terms[5], "mid word (rank 500)": terms[500],
             "rare word": terms[-100], "two common words": f"{terms[3]} {terms[8]}",
             "prefix (3 letters)": terms[1000][:3] + "*",
             # (read in the text, not the index: store.SearchWords.inside; found nowhere)
             "CJK word": "大阪", "CJK word, common word": f"大阪 {terms[5]}"}
    scopes = {"all": rooms, "one": rooms[:1], "small": ["small"],
              **{f"size{n}": [f"size{n}"] for n in sizes}}
    for name, q in cases.items():
        for newest in (False, True):
            line = f"{name:24} {'newest' if newest else 'ranked':6} q={q!r:24}"
            for scope, readable in scopes.items():
                times = []
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    st.search(q, readable, newest=newest, limit=20, offset=0)
                    times.append((time.perf_counter() - t0) * 1000)
                line += f" {scope}: {statistics.median(times):6.1f} ms (max {max(times):6.1f})"
            print(line)
    st.close()


if __name__ == "__main__":
    main()
