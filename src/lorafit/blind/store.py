"""The study file: one SQLite database holding items, raters, each rater's layout and the ratings.

Durability: the file is in WAL mode and every connection uses ``synchronous=FULL``. In WAL mode
``NORMAL`` already survives a crash of the server process (kill -9): a commit is in the WAL, i.e.
in the OS page cache, before the API answers. ``FULL`` also fsyncs the WAL at every commit, so an
acknowledged rating survives power loss or an OS crash too. A rating is one human decision made
every ~30 s, so one fsync per rating costs nothing that matters; losing one costs a rater's time.

Ratings are stored in *model space* (``a_*``/``b_*``, preference ``a|b|tie``); the rater only ever
sees *slot space* (Answer 1/2). ``to_model_space``/``to_slot_space`` are the only translation
between the two, and the slot of model A for each (rater, item) is fixed in ``layout``.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from ..errors import DataError

SCHEMA_VERSION = "1"
DIMENSIONS = ("accuracy", "completeness", "logic", "fluency")
SCORE_COLUMNS = tuple(f"{m}_{d}" for m in ("a", "b") for d in DIMENSIONS)

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    item_id  TEXT PRIMARY KEY,            -- opaque random id: the only id raters see
    pos      INTEGER NOT NULL UNIQUE,     -- 1-based line in file A
    line_b   INTEGER NOT NULL,            -- 1-based line in file B
    prompt   TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    label    TEXT NOT NULL
);
CREATE TABLE raters (
    rater_id   TEXT PRIMARY KEY,
    idx        INTEGER NOT NULL UNIQUE,   -- 1-based, for the admin only
    token_hash TEXT NOT NULL UNIQUE       -- sha256 of the link token; the token itself is not kept
);
CREATE TABLE layout (
    rater_id TEXT NOT NULL REFERENCES raters(rater_id),
    item_id  TEXT NOT NULL REFERENCES items(item_id),
    rank     INTEGER NOT NULL,            -- the order this rater sees the items in
    a_slot   INTEGER NOT NULL CHECK (a_slot IN (1, 2)),
    PRIMARY KEY (rater_id, item_id),
    UNIQUE (rater_id, rank)
) WITHOUT ROWID;
CREATE TABLE ratings (
    rater_id   TEXT NOT NULL,
    item_id    TEXT NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL CHECK ({c} BETWEEN 1 AND 5)" for c in SCORE_COLUMNS)},
    preference TEXT NOT NULL CHECK (preference IN ('a', 'b', 'tie')),
    comment    TEXT NOT NULL DEFAULT '',
    submits    INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    -- one row per (rater, item), whatever the API does: a repeated submit can only update it
    PRIMARY KEY (rater_id, item_id),
    FOREIGN KEY (rater_id, item_id) REFERENCES layout(rater_id, item_id)
) WITHOUT ROWID;
"""


def hash_token(token: str) -> str:
    """Tokens are stored hashed so a copied study file does not hand out working links."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def connect(path: str | Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit, see ``transaction``)."""
    path = Path(path)
    if not create and not path.is_file():
        raise DataError("study file not found", file=str(path))
    mode = "rwc" if create else "rw"
    if create and not path.exists():
        # The study names the models and holds the raters' answers: owner-only from the first byte
        # (SQLite gives its -wal/-shm files the database file's permissions).
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode={mode}", uri=True, timeout=30,
                           isolation_level=None, check_same_thread=True)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DataError(f"not a lorafit blind study ({e})", file=str(path)) from None
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on
    busy_timeout instead of failing with a lock upgrade deadlock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)


def enable_wal(conn: sqlite3.Connection) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":  # e.g. a filesystem without shared memory
        raise DataError(f"cannot put the study in WAL mode (got {mode!r})")


@dataclass(frozen=True)
class Item:
    item_id: str
    pos: int
    prompt: str
    answer_a: str
    answer_b: str


@dataclass
class Study:
    """The read-only part of a study, loaded once by the server."""
    path: Path
    meta: dict[str, str]
    items: dict[str, Item]
    raters: dict[str, int]                      # rater_id -> idx
    token_hashes: list[tuple[str, str]]         # (token_hash, rater_id)
    layout: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # rater -> [(item, a_slot)]

    def a_slot(self, rater_id: str, item_id: str) -> int | None:
        return self._slots.get((rater_id, item_id))

    def __post_init__(self) -> None:
        self._slots = {(r, i): s for r, rows in self.layout.items() for i, s in rows}


def load_study(path: str | Path) -> Study:
    """Read and check everything but the ratings; a file that is not a study is a DataError."""
    conn = connect(path)
    try:
        try:
            meta = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise DataError(f"not a lorafit blind study ({e})", file=str(path)) from None
        if meta.get("schema") != SCHEMA_VERSION:
            raise DataError(f"unsupported study schema {meta.get('schema')!r} "
                            f"(this lorafit reads {SCHEMA_VERSION})", file=str(path))
        items = {r["item_id"]: Item(r["item_id"], r["pos"], r["prompt"], r["answer_a"], r["answer_b"])
                 for r in conn.execute("SELECT * FROM items ORDER BY pos")}
        raters, hashes = {}, []
        for r in conn.execute("SELECT rater_id, idx, token_hash FROM raters ORDER BY idx"):
            raters[r["rater_id"]] = r["idx"]
            hashes.append((r["token_hash"], r["rater_id"]))
        layout: dict[str, list[tuple[str, int]]] = {rid: [] for rid in raters}
        for r in conn.execute("SELECT rater_id, item_id, a_slot FROM layout ORDER BY rater_id, rank"):
            layout[r["rater_id"]].append((r["item_id"], r["a_slot"]))
    finally:
        conn.close()
    return Study(Path(path), meta, items, raters, hashes, layout)


def to_model_space(a_slot: int, answer1: dict[str, int], answer2: dict[str, int],
                   preference: str) -> dict[str, Any]:
    """What the rater said about Answer 1/2 -> columns about model A/B."""
    a, b = (answer1, answer2) if a_slot == 1 else (answer2, answer1)
    row: dict[str, Any] = {f"a_{d}": a[d] for d in DIMENSIONS}
    row.update({f"b_{d}": b[d] for d in DIMENSIONS})
    row["preference"] = "tie" if preference == "tie" else ("a" if int(preference) == a_slot else "b")
    return row


def to_slot_space(a_slot: int, row: sqlite3.Row | dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``to_model_space``: what this rater sees about their own rating."""
    a = {d: row[f"a_{d}"] for d in DIMENSIONS}
    b = {d: row[f"b_{d}"] for d in DIMENSIONS}
    one, two = (a, b) if a_slot == 1 else (b, a)
    pref = row["preference"]
    slot_pref = "tie" if pref == "tie" else str(a_slot if pref == "a" else 3 - a_slot)
    return {"answer1": one, "answer2": two, "preference": slot_pref, "comment": row["comment"]}


def upsert_rating(conn: sqlite3.Connection, rater_id: str, item_id: str, row: dict[str, Any],
                  comment: str) -> None:
    """Insert or replace this rater's rating of this item; never a second row."""
    cols = list(SCORE_COLUMNS) + ["preference"]
    values = [row[c] for c in cols]
    ts = now()
    with transaction(conn):
        conn.execute(
            f"INSERT INTO ratings (rater_id, item_id, {', '.join(cols)}, comment, created_at, updated_at)"
            f" VALUES (?, ?, {', '.join('?' * len(cols))}, ?, ?, ?)"
            f" ON CONFLICT (rater_id, item_id) DO UPDATE SET"
            f" {', '.join(f'{c} = excluded.{c}' for c in cols)}, comment = excluded.comment,"
            f" submits = submits + 1, updated_at = excluded.updated_at",
            [rater_id, item_id, *values, comment, ts, ts])


def get_rating(conn: sqlite3.Connection, rater_id: str, item_id: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM ratings WHERE rater_id = ? AND item_id = ?",
                        (rater_id, item_id)).fetchone()


def rated_items(conn: sqlite3.Connection, rater_id: str) -> set[str]:
    return {r[0] for r in conn.execute("SELECT item_id FROM ratings WHERE rater_id = ?", (rater_id,))}


def all_ratings(path: str | Path) -> list[dict[str, Any]]:
    """Every rating in model space, with the rater's index, the item's line and A's slot."""
    conn = connect(path)
    try:
        rows = conn.execute(
            "SELECT r.*, raters.idx AS rater, items.pos AS item, layout.a_slot AS a_slot"
            " FROM ratings r JOIN raters USING (rater_id) JOIN items USING (item_id)"
            " JOIN layout USING (rater_id, item_id) ORDER BY items.pos, raters.idx").fetchall()
    finally:
        conn.close()
    return [dict(r) for r in rows]
