"""The SQLite ledger: every image by content id, every label with provenance, every round.

Tables
------
images      id (sha256 of the file's bytes) -> path, size, mtime, format, first seen
labels      append-only: image id, label, round, source, annotator, file/line it came from, time
rounds      one row per exported round: strategy, budget, model round, times, status
selections  what a round exported: image id, rank, score, predicted class, probabilities, file
metrics     per model round and split: metric name -> value
skipped     files that could not be read, with the reason (latest scan)

Images are keyed by id, never by position in a pool. The "current" label of an image is its most
recent label row.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import WorkspaceError
from .faults import crash_point

SCHEMA_VERSION = 3  # 2: metrics.value may be NULL (a metric undefined on its split)
# 3: labels.comment (the annotator's comment on the image, from labels.csv)

_METRICS_TABLE = """CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL,
    split TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (round, split, name)
)"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    format TEXT NOT NULL,
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_path ON images(path);
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id TEXT NOT NULL REFERENCES images(id),
    label TEXT NOT NULL,
    round INTEGER NOT NULL,
    source TEXT NOT NULL,
    annotator TEXT,
    origin TEXT,
    created_at REAL NOT NULL,
    comment TEXT
);
CREATE INDEX IF NOT EXISTS labels_image ON labels(image_id);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    strategy TEXT NOT NULL,
    budget INTEGER NOT NULL,
    mc_samples INTEGER NOT NULL,
    model_round INTEGER NOT NULL,
    pool_size INTEGER NOT NULL,
    folder TEXT NOT NULL,
    exported_at REAL NOT NULL,
    ingested_at REAL,
    score_seconds REAL
);
CREATE TABLE IF NOT EXISTS selections (
    round INTEGER NOT NULL REFERENCES rounds(round),
    image_id TEXT NOT NULL REFERENCES images(id),
    rank INTEGER NOT NULL,
    file TEXT NOT NULL,
    score REAL NOT NULL,
    predicted TEXT NOT NULL,
    probs TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (round, image_id),
    UNIQUE (round, file)
);
CREATE TABLE IF NOT EXISTS models (
    round INTEGER PRIMARY KEY,
    checkpoint TEXT NOT NULL,
    parent INTEGER,
    n_labels INTEGER NOT NULL,
    epochs INTEGER NOT NULL,
    train_seconds REAL NOT NULL,
    created_at REAL NOT NULL
);
{metrics}
CREATE TABLE IF NOT EXISTS holdout (
    image_id TEXT PRIMARY KEY REFERENCES images(id),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    seen_at REAL NOT NULL
);
""".replace("{metrics}", _METRICS_TABLE + ";")


@dataclass(frozen=True)
class ImageRecord:
    id: str
    path: str
    size: int
    mtime_ns: int
    format: str


@dataclass(frozen=True)
class LabelRecord:
    image_id: str
    label: str
    round: int
    source: str
    annotator: str | None
    origin: str | None
    created_at: float
    comment: str | None = None
    """The annotator's comment on the image (labels.csv's optional ``comment`` column)."""


@dataclass(frozen=True)
class RoundRecord:
    round: int
    strategy: str
    budget: int
    mc_samples: int
    model_round: int
    pool_size: int
    folder: str
    exported_at: float
    ingested_at: float | None
    score_seconds: float | None


@dataclass(frozen=True)
class ModelRecord:
    """One trained model: its round, checkpoint (relative to the workspace), the model round
    it was fine-tuned from (``None``: fresh weights), labels, epochs, fitting time."""

    round: int
    checkpoint: str
    parent: int | None
    n_labels: int
    epochs: int
    train_seconds: float
    created_at: float


@dataclass(frozen=True)
class Selection:
    round: int
    image_id: str
    rank: int
    file: str
    score: float
    predicted: str
    probs: tuple[float, ...]
    sha256: str = ""
    """SHA-256 of the exported copy (differs from the image id when de-identified)."""


class Ledger:
    """A SQLite file holding all of medal's durable state except weights and image files.

    The only module with SQL: callers get and give typed records. Every write is one
    :meth:`transaction`, so a crash leaves either all or none of a step.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
            self._migrate()

    def _migrate(self) -> None:
        """Bring a ledger written by an older medal up to :data:`SCHEMA_VERSION`."""
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        version = int(row["value"])
        if version > SCHEMA_VERSION:
            raise WorkspaceError(
                f"{self.path} was written by a newer medal (ledger schema "
                f"{version}; this medal reads up to {SCHEMA_VERSION}); upgrade medal"
            )
        if version < 2:  # metrics.value NOT NULL -> nullable (undefined metrics are NULL)
            self._db.execute("ALTER TABLE metrics RENAME TO metrics_v1")
            self._db.execute(_METRICS_TABLE)
            self._db.execute("INSERT INTO metrics SELECT round, split, name, value FROM metrics_v1")
            self._db.execute("DROP TABLE metrics_v1")
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(labels)")}
        if "comment" not in columns:  # version < 3: labels.comment
            self._db.execute("ALTER TABLE labels ADD COLUMN comment TEXT")
        self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: commits on success, rolls back on any exception.

        A write or commit that fails for lack of space ("database or disk is full", "disk
        I/O error") may have rolled the transaction back already (SQLite does so for
        SQLITE_FULL and SQLITE_IOERR); the original error is raised either way, never a
        "cannot rollback" in its place.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error says more
            raise

    # --- images -------------------------------------------------------------------------------
    # --- meta ---------------------------------------------------------------------------------
    def meta_value(self, key: str, default: str) -> str:
        """The stored value of ``key``; ``default`` is stored (and returned) the first time."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            if row is not None:
                return str(row["value"])
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, default))
            return default

    def images_by_path(self) -> dict[str, ImageRecord]:
        """File records by path (frame records of multi-frame files are left out)."""
        rows = self._db.execute(
            "SELECT id, path, size, mtime_ns, format FROM images WHERE id NOT LIKE '%#%'"
        )
        return {r["path"]: ImageRecord(**dict(r)) for r in rows}

    def frame_ids(self, file_id: str) -> list[str]:
        """Ids of the frame records of a multi-frame file, in frame order."""
        rows = self._db.execute("SELECT id FROM images WHERE id LIKE ? ", (file_id + "#f%",))
        return sorted((r["id"] for r in rows), key=lambda i: int(i.rsplit("#f", 1)[1]))

    def image(self, image_id: str) -> ImageRecord | None:
        r = self._db.execute(
            "SELECT id, path, size, mtime_ns, format FROM images WHERE id=?", (image_id,)
        ).fetchone()
        return ImageRecord(**dict(r)) if r else None

    def upsert_images(self, records: Iterable[ImageRecord]) -> None:
        """Add images; an id seen before keeps its id and gets the newest path/size/mtime."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO images(id, path, size, mtime_ns, format, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "path=excluded.path, size=excluded.size, mtime_ns=excluded.mtime_ns",
                [(r.id, r.path, r.size, r.mtime_ns, r.format, now) for r in records],
            )

    def set_skipped(self, skipped: dict[str, str]) -> None:
        """Replace the list of unreadable files with ``{path: reason}`` from the latest scan."""
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM skipped")
            db.executemany(
                "INSERT INTO skipped(path, reason, seen_at) VALUES (?, ?, ?)",
                [(p, r, now) for p, r in sorted(skipped.items())],
            )

    def skipped(self) -> dict[str, str]:
        return {
            r["path"]: r["reason"]
            for r in self._db.execute("SELECT path, reason FROM skipped ORDER BY path")
        }

    # --- labels -------------------------------------------------------------------------------
    def current_labels(self) -> dict[str, str]:
        """``{image_id: label}`` using each image's most recent label row. A most recent row
        with an empty label (an image released back to the pool) means "no label"."""
        rows = self._db.execute(
            "SELECT image_id, label FROM labels WHERE seq IN "
            "(SELECT MAX(seq) FROM labels GROUP BY image_id)"
        )
        return {r["image_id"]: r["label"] for r in rows if r["label"]}

    def labels(self, round_no: int | None = None) -> list[LabelRecord]:
        q = (
            "SELECT image_id, label, round, source, annotator, origin, created_at, comment "
            "FROM labels"
        )
        args: tuple[Any, ...] = ()
        if round_no is not None:
            q += " WHERE round=?"
            args = (round_no,)
        return [LabelRecord(**dict(r)) for r in self._db.execute(q + " ORDER BY seq", args)]

    def round_label_counts(self, final_sources: Sequence[str]) -> dict[int, tuple[int, int]]:
        """``{round: (images, reader rows)}``: the images given a label (``unsure`` included)
        by a row of ``final_sources`` in the round, and the round's rows from readers' own
        ``labels_<name>.csv`` files (kept beside the final labels, so a row count would count
        an image once per reader and once more)."""
        marks = ",".join("?" * len(final_sources))
        rows = self._db.execute(
            f"SELECT round, COUNT(DISTINCT CASE WHEN source IN ({marks}) AND label != '' "
            f"THEN image_id END) AS images, "
            f"SUM(source LIKE 'labels\\_%.csv' ESCAPE '\\') AS readers "
            f"FROM labels GROUP BY round",
            tuple(final_sources),
        )
        return {r["round"]: (r["images"], r["readers"] or 0) for r in rows}

    def add_labels(self, rows: Sequence[LabelRecord]) -> None:
        """Append label rows (one transaction)."""
        with self.transaction() as db:
            self._add_labels(db, rows)

    def record_ingest(self, round_no: int, rows: Sequence[LabelRecord], when: float) -> None:
        """A round's labels and its ingest time, in one transaction."""
        with self.transaction() as db:
            self._add_labels(db, rows)
            db.execute("UPDATE rounds SET ingested_at=? WHERE round=?", (when, round_no))
            crash_point("ledger.ingest_before_commit")

    @staticmethod
    def _add_labels(db: sqlite3.Connection, rows: Sequence[LabelRecord]) -> None:
        db.executemany(
            "INSERT INTO labels(image_id, label, round, source, annotator, origin, created_at, "
            "comment) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.image_id,
                    r.label,
                    r.round,
                    r.source,
                    r.annotator,
                    r.origin,
                    r.created_at,
                    r.comment,
                )
                for r in rows
            ],
        )

    # --- frozen validation split -------------------------------------------------------------
    def holdout(self) -> list[str] | None:
        """Image ids of the frozen validation split; ``None`` if it was never chosen."""
        chosen = self._db.execute("SELECT value FROM meta WHERE key='holdout'").fetchone()
        if chosen is None:
            return None
        return [
            r["image_id"]
            for r in self._db.execute("SELECT image_id FROM holdout ORDER BY image_id")
        ]

    def set_holdout(self, image_ids: Sequence[str]) -> None:
        """Freeze the validation split (once; later calls are refused)."""
        with self.transaction() as db:
            db.execute("INSERT INTO meta(key, value) VALUES ('holdout', ?)", (str(len(image_ids)),))
            now = time.time()
            db.executemany(
                "INSERT INTO holdout(image_id, created_at) VALUES (?, ?)",
                [(i, now) for i in image_ids],
            )

    # --- rounds -------------------------------------------------------------------------------
    def rounds(self) -> list[RoundRecord]:
        return [
            RoundRecord(**dict(r)) for r in self._db.execute("SELECT * FROM rounds ORDER BY round")
        ]

    def round(self, number: int) -> RoundRecord | None:
        r = self._db.execute("SELECT * FROM rounds WHERE round=?", (number,)).fetchone()
        return RoundRecord(**dict(r)) if r else None

    def record_round(self, rec: RoundRecord, selections: Sequence[Selection]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO rounds(round, strategy, budget, mc_samples, model_round, pool_size, "
                "folder, exported_at, ingested_at, score_seconds) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.round,
                    rec.strategy,
                    rec.budget,
                    rec.mc_samples,
                    rec.model_round,
                    rec.pool_size,
                    rec.folder,
                    rec.exported_at,
                    rec.ingested_at,
                    rec.score_seconds,
                ),
            )
            db.executemany(
                "INSERT INTO selections(round, image_id, rank, file, score, predicted, probs, "
                "sha256) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        s.round,
                        s.image_id,
                        s.rank,
                        s.file,
                        s.score,
                        s.predicted,
                        json.dumps(s.probs),
                        s.sha256 or s.image_id,
                    )
                    for s in selections
                ],
            )
            crash_point("ledger.round_before_commit")

    def selections(self, round_no: int) -> list[Selection]:
        rows = self._db.execute("SELECT * FROM selections WHERE round=? ORDER BY rank", (round_no,))
        return [
            Selection(
                round=r["round"],
                image_id=r["image_id"],
                rank=r["rank"],
                file=r["file"],
                score=r["score"],
                predicted=r["predicted"],
                probs=tuple(json.loads(r["probs"])),
                sha256=r["sha256"],
            )
            for r in rows
        ]

    def pending_image_ids(self) -> set[str]:
        """Images exported in a round that has not been ingested yet (out of the pool)."""
        rows = self._db.execute(
            "SELECT s.image_id FROM selections s JOIN rounds r ON r.round = s.round "
            "WHERE r.ingested_at IS NULL"
        )
        return {r["image_id"] for r in rows}

    # --- models and metrics -------------------------------------------------------------------
    def record_model(
        self,
        round_no: int,
        checkpoint: str,
        parent: int | None,
        n_labels: int,
        epochs: int,
        train_seconds: float,
        metrics: dict[str, dict[str, float]],
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO models(round, checkpoint, parent, n_labels, epochs, "
                "train_seconds, created_at) VALUES (?,?,?,?,?,?,?)",
                (round_no, checkpoint, parent, n_labels, epochs, train_seconds, time.time()),
            )
            db.execute("DELETE FROM metrics WHERE round=?", (round_no,))
            db.executemany(
                "INSERT INTO metrics(round, split, name, value) VALUES (?,?,?,?)",
                [
                    (round_no, split, name, _defined(v))
                    for split, d in metrics.items()
                    for name, v in d.items()
                ],
            )
            crash_point("ledger.model_before_commit")

    _MODEL_COLUMNS = "round, checkpoint, parent, n_labels, epochs, train_seconds, created_at"

    def models(self) -> list[ModelRecord]:
        return [
            ModelRecord(**dict(r))
            for r in self._db.execute(f"SELECT {self._MODEL_COLUMNS} FROM models ORDER BY round")
        ]

    def latest_model(self) -> ModelRecord | None:
        r = self._db.execute(
            f"SELECT {self._MODEL_COLUMNS} FROM models ORDER BY round DESC LIMIT 1"
        ).fetchone()
        return ModelRecord(**dict(r)) if r else None

    def metrics(self) -> dict[int, dict[str, dict[str, float]]]:
        """``{model_round: {split: {metric: value}}}``; an undefined metric (stored as NULL,
        e.g. AUROC on a split with one class) reads back as NaN."""
        out: dict[int, dict[str, dict[str, float]]] = {}
        for r in self._db.execute("SELECT round, split, name, value FROM metrics"):
            v = float("nan") if r["value"] is None else float(r["value"])
            out.setdefault(r["round"], {}).setdefault(r["split"], {})[r["name"]] = v
        return out


def _defined(v: float | None) -> float | None:
    """A metric value for the ledger: NaN, infinities and None (undefined) become NULL."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def round_ingest_state(path: Path, round_no: int) -> tuple[float | None, set[str]] | None:
    """Read-only look at round ``round_no`` in the ledger at ``path``: ``(ingested_at or None,
    the exported file names)``; ``None`` when there is no such ledger or round. Opens the file
    read-only and writes nothing, so a process that is not a medal command (the labelling
    page) can ask while ``medal ingest`` runs."""
    if not Path(path).is_file():
        return None
    try:
        db = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, timeout=10.0)
        try:
            row = db.execute("SELECT ingested_at FROM rounds WHERE round=?", (round_no,)).fetchone()
            files = {
                r[0] for r in db.execute("SELECT file FROM selections WHERE round=?", (round_no,))
            }
        finally:
            db.close()
    except sqlite3.Error as e:
        raise WorkspaceError(f"{path}: cannot be read: {e}") from None
    return None if row is None else (row[0], files)
