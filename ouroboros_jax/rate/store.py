"""The rating queue and its ratings in one SQLite file.

A training process enqueues items (`RatingStore.enqueue`); the rating server,
in the same or another process, serves them (`next_item`) and stores ratings
(`add_rating`); the trainer reads the ratings back (`rate.feedback`). Every
call opens its own short-lived connection, so one store object may be used
from several threads, and several processes may open the same file.

Durability. The file is in write-ahead-log mode with ``synchronous=FULL``:
every write is its own transaction, committed (and the log synced to disk)
before the call returns, so a rating the server has answered for survives the
server being killed, and a power cut too. WAL lets the trainer read while the
server writes. WAL needs the processes to share one host and a local file
system (not NFS or a bucket mount): keep the run directory's database local.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ouroboros_jax.rate.items import (
    DuplicateRatingError,
    Item,
    NewItem,
    Rating,
    RatingError,
    UnknownItemError,
    check_rater,
    check_rating,
)

DB_NAME = "ratings.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE,
    prompt TEXT NOT NULL,
    completions TEXT NOT NULL,          -- JSON list of K strings
    mode TEXT NOT NULL CHECK (mode IN ('pairwise', 'pointwise')),
    score_min INTEGER NOT NULL,
    score_max INTEGER NOT NULL,
    ratings_wanted INTEGER NOT NULL,
    n_ratings INTEGER NOT NULL DEFAULT 0,  -- ratings that are not skips
    priority REAL NOT NULL,
    spread REAL,
    judge_confidence REAL,
    ensemble_scores TEXT,               -- JSON [E][K] or NULL
    step INTEGER,
    example_id TEXT,
    metadata TEXT NOT NULL,             -- JSON object
    created REAL NOT NULL
);
-- The queue: open items only, best first. Rated items leave the index, so serving the next
-- item and counting open ones stay cheap however many items a long run has rated.
CREATE INDEX IF NOT EXISTS items_open ON items (priority DESC, id) WHERE n_ratings < ratings_wanted;
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a cursor for "ratings since"
    item_id INTEGER NOT NULL REFERENCES items (id),
    rater TEXT NOT NULL,
    choice INTEGER,
    scores TEXT,                        -- JSON list of K numbers
    skipped INTEGER NOT NULL DEFAULT 0,
    shown_order TEXT,                   -- JSON permutation the page displayed
    created REAL NOT NULL,
    UNIQUE (item_id, rater)
);
CREATE INDEX IF NOT EXISTS ratings_by_rater ON ratings (rater);
"""

_ITEM_COLUMNS = ("id, prompt, completions, mode, score_min, score_max, ratings_wanted, n_ratings, priority, "
                 "spread, judge_confidence, ensemble_scores, step, example_id, key, metadata, created")
_RATING_COLUMNS = "id, item_id, rater, choice, scores, skipped, shown_order, created"
NEXT_ITEM_SQL = (f"SELECT {_ITEM_COLUMNS} FROM items AS i WHERE n_ratings < ratings_wanted AND NOT EXISTS "
                 "(SELECT 1 FROM ratings AS r WHERE r.item_id = i.id AND r.rater = ?) "
                 "ORDER BY priority DESC, id LIMIT 1")


@dataclasses.dataclass(frozen=True)
class QueueCounts:
    """What the queue holds; `waiting` and `rated_by_rater` are for one rater (None without one)."""

    items: int
    open: int  # items with fewer ratings than they want
    ratings: int  # not counting skips
    skipped: int
    raters: int
    waiting: int | None = None  # open items this rater has neither rated nor skipped
    rated_by_rater: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _item(row: sqlite3.Row) -> Item:
    values = dict(zip(row.keys(), row, strict=True))
    values["completions"] = tuple(json.loads(values["completions"]))
    scores = _tuple_or_none(values["ensemble_scores"])
    values["ensemble_scores"] = None if scores is None else tuple(tuple(r) for r in scores)
    values["metadata"] = json.loads(values["metadata"])
    return Item(**values)


def _rating(row: sqlite3.Row) -> Rating:
    return Rating(
        id=row["id"], item_id=row["item_id"], rater=row["rater"], choice=row["choice"],
        scores=_tuple_or_none(row["scores"]), skipped=bool(row["skipped"]),
        order=_tuple_or_none(row["shown_order"]),
        created=row["created"])


class RatingStore:
    """The queue of items to rate and their ratings, in the SQLite file `path` (created if absent).

    Raises:
      RatingError: when `path` is a SQLite file of a newer schema, or not a rating database.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent}: no such directory for the ratings database")
        with self._connect() as db:
            db.execute("PRAGMA journal_mode = WAL")  # stored in the file: once set, every connection uses it
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RatingError(f"{self.path}: rating database schema {version} is newer than this "
                                  f"library's ({SCHEMA_VERSION})")
            if version == 0:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables:
                    raise RatingError(f"{self.path}: a SQLite file with other tables {sorted(tables)}, "
                                      "not a rating database")
                for statement in _SCHEMA.split(";"):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @classmethod
    def in_run_dir(cls, run_dir: str | os.PathLike[str]) -> RatingStore:
        """The store of a run: ``RUN_DIR/ratings.sqlite``; the directory must exist."""
        run = Path(run_dir)
        if not run.is_dir():
            raise FileNotFoundError(f"{run}: no such run directory")
        return cls(run / DB_NAME)

    def __repr__(self) -> str:
        return f"RatingStore({str(self.path)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit mode (isolation_level=None): writes open their own BEGIN IMMEDIATE,
        # so a writer takes the lock up front instead of failing to upgrade a read lock.
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed before the block's caller goes on; rolled back on error."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Several reads from one snapshot (a rating stored meanwhile is in all of them or none)."""
        with self._connect() as db:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    # -- producers -----------------------------------------------------------

    def enqueue(self, prompt: str, completions: Iterable[str], **fields: Any) -> int:
        """Add one item (the keyword fields are `NewItem`'s) and return its id."""
        return self.enqueue_many([NewItem(prompt, tuple(completions), **fields)])[0]

    def enqueue_many(self, items: Iterable[NewItem]) -> list[int]:
        """Add items in one transaction; returns their ids (an existing key returns its item's id)."""
        items = list(items)
        for i, item in enumerate(items):
            if not isinstance(item, NewItem):
                raise RatingError(f"items[{i}]: expected a NewItem, got {type(item).__name__}", "items")
        ids = []
        now = time.time()
        with self._write() as db:
            for item in items:
                if item.key is not None:
                    row = db.execute("SELECT id FROM items WHERE key = ?", (item.key,)).fetchone()
                    if row is not None:
                        ids.append(row["id"])
                        continue
                cursor = db.execute(
                    "INSERT INTO items (key, prompt, completions, mode, score_min, score_max, "
                    "ratings_wanted, priority, spread, judge_confidence, ensemble_scores, step, example_id, "
                    "metadata, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.key, item.prompt, json.dumps(list(item.completions)), item.mode, *item.score_range,
                     item.ratings_wanted, item.priority, item.spread, item.judge_confidence,
                     _json_or_none(item.ensemble_scores), item.step, item.example_id,
                     json.dumps(dict(item.metadata)), now))
                ids.append(cursor.lastrowid)
        return ids

    # -- the rating server ---------------------------------------------------

    def get_item(self, item_id: int) -> Item:
        """The item with this id; raises `UnknownItemError` when there is none."""
        with self._connect() as db:
            return self._get_item(db, item_id)

    @staticmethod
    def _get_item(db: sqlite3.Connection, item_id: Any) -> Item:
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            raise RatingError(f"item_id: expected an integer, got {type(item_id).__name__} {item_id!r:.60}",
                              "item_id")
        row = db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise UnknownItemError(f"item_id: no item {item_id} in the queue", "item_id")
        return _item(row)

    def next_item(self, rater: str) -> Item | None:
        """The open item of highest priority (oldest first among equals) that `rater`
        has neither rated nor skipped; None when there is none.

        Two raters asking at once may get the same item; both ratings are kept.
        """
        rater = check_rater(rater)
        with self._connect() as db:
            row = db.execute(NEXT_ITEM_SQL, (rater,)).fetchone()
        return None if row is None else _item(row)

    def add_rating(self, item_id: int, rater: str, *, choice: int | None = None,
                   scores: Iterable[float] | None = None, skip: bool = False,
                   order: Iterable[int] | None = None) -> Rating:
        """Validate and store one rating; it is committed when this returns.

        Raises:
          UnknownItemError: no such item.
          DuplicateRatingError: `rater` has already rated or skipped this item.
          RatingError: any other bad field (see `items.check_rating`).
        """
        rater = check_rater(rater)
        now = time.time()
        with self._write() as db:
            item = self._get_item(db, item_id)
            checked = check_rating(item, choice=choice, scores=scores, skip=skip, order=order)
            try:
                cursor = db.execute(
                    "INSERT INTO ratings (item_id, rater, choice, scores, skipped, shown_order, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (item.id, rater, checked.choice, _json_or_none(checked.scores), int(checked.skipped),
                     _json_or_none(checked.order), now))
            except sqlite3.IntegrityError:
                raise DuplicateRatingError(f"rater {rater!r} has already rated item {item.id}",
                                           "rater") from None
            if not checked.skipped:
                db.execute("UPDATE items SET n_ratings = n_ratings + 1 WHERE id = ?", (item.id,))
        return Rating(id=cursor.lastrowid, item_id=item.id, rater=rater, choice=checked.choice,
                      scores=checked.scores, skipped=checked.skipped, order=checked.order, created=now)

    def counts(self, rater: str | None = None) -> QueueCounts:
        """Items, open items, ratings, skips and raters; with `rater`, also what is left for them."""
        with self._read() as db:
            items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            open_ = db.execute("SELECT COUNT(*) FROM items WHERE n_ratings < ratings_wanted").fetchone()[0]
            ratings, skipped, raters = db.execute(
                "SELECT COALESCE(SUM(NOT skipped), 0), COALESCE(SUM(skipped), 0), COUNT(DISTINCT rater) "
                "FROM ratings").fetchone()
            waiting = rated = None
            if rater is not None:
                rater = check_rater(rater)
                # Open items minus the open ones this rater has done: O(their ratings), not O(items).
                done_open = db.execute(
                    "SELECT COUNT(*) FROM ratings AS r JOIN items AS i ON i.id = r.item_id "
                    "WHERE r.rater = ? AND i.n_ratings < i.ratings_wanted", (rater,)).fetchone()[0]
                waiting = open_ - done_open
                rated = db.execute("SELECT COUNT(*) FROM ratings WHERE rater = ? AND NOT skipped",
                                   (rater,)).fetchone()[0]
        return QueueCounts(items, open_, ratings, skipped, raters, waiting, rated)

    # -- readers -------------------------------------------------------------

    def ratings(self, *, since: int = 0, until: int | None = None) -> list[Rating]:
        """Stored ratings (skips included) with `since < id <= until`, in the order they were given."""
        with self._connect() as db:
            rows = db.execute(f"SELECT {_RATING_COLUMNS} FROM ratings WHERE id > ? AND id <= ? ORDER BY id",
                              (since, _upper(until))).fetchall()
        return [_rating(r) for r in rows]

    def rated(self, *, since: int = 0, until: int | None = None,
              mode: str | None = None) -> list[tuple[Rating, Item]]:
        """Ratings that are not skips, each with its item, `since < id <= until`, optionally of one mode."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_RATING_COLUMNS} FROM ratings WHERE id > ? AND id <= ? AND NOT skipped ORDER BY id",
                (since, _upper(until))).fetchall()
            ratings = [_rating(r) for r in rows]
            items = {row["id"]: _item(row) for row in db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE id IN (SELECT item_id FROM ratings "
                "WHERE id > ? AND id <= ? AND NOT skipped)", (since, _upper(until)))}
        return [(r, items[r.item_id]) for r in ratings if mode is None or items[r.item_id].mode == mode]

    def count_ratings(self, *, since: int = 0, mode: str | None = None) -> tuple[int, int]:
        """(number of ratings that are not skips with id > since, the last rating id, 0 if none)."""
        with self._read() as db:
            count = db.execute(
                "SELECT COUNT(*) FROM ratings AS r JOIN items AS i ON i.id = r.item_id "
                "WHERE r.id > ? AND NOT r.skipped AND (? IS NULL OR i.mode = ?)",
                (since, mode, mode)).fetchone()[0]
            last = db.execute("SELECT COALESCE(MAX(id), 0) FROM ratings").fetchone()[0]
        return count, last


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _tuple_or_none(text: str | None) -> tuple[Any, ...] | None:
    return None if text is None else tuple(json.loads(text))


def _upper(until: int | None) -> int:
    return 2**63 - 1 if until is None else until
