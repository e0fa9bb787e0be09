import sqlite3

import pytest

from medal.ledger import ImageRecord, LabelRecord, Ledger, ModelRecord, RoundRecord, Selection


def img(i: str) -> ImageRecord:
    return ImageRecord(i, f"/data/{i}.png", 10, 1, "pillow")


def test_labels_are_append_only_and_latest_wins(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as db:
        db.upsert_images([img("a"), img("b")])
        db.add_labels(
            [
                LabelRecord("a", "normal", 0, "initial", None, "x", 1.0),
                LabelRecord("b", "pneumonia", 1, "labels.csv", "dr", "y", 2.0),
            ]
        )
        db.add_labels([LabelRecord("a", "pneumonia", 2, "labels.csv", None, "z", 3.0)])
        assert db.current_labels() == {"a": "pneumonia", "b": "pneumonia"}
        assert [r.label for r in db.labels() if r.image_id == "a"] == ["normal", "pneumonia"]
        assert [r.image_id for r in db.labels(round_no=1)] == ["b"]


def test_transaction_rolls_back_on_error(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as db:
        db.upsert_images([img("a")])
        db.record_round(
            RoundRecord(1, "bald", 1, 20, 0, 100, "/ws/r1", 5.0, None, 1.5),
            [Selection(1, "a", 1, "001_a.png", 0.9, "normal", (0.6, 0.4))],
        )
        with pytest.raises(sqlite3.IntegrityError):  # the second row names an unknown image
            db.record_ingest(
                1,
                [
                    LabelRecord("a", "normal", 1, "labels.csv", None, None, 1.0),
                    LabelRecord("zz", "normal", 1, "labels.csv", None, None, 1.0),
                ],
                6.0,
            )
        assert db.current_labels() == {}
        assert db.round(1).ingested_at is None


def test_foreign_keys_refuse_unknown_image(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as db:
        with pytest.raises(sqlite3.IntegrityError):
            db.add_labels([LabelRecord("zz", "normal", 0, "x", None, None, 1.0)])


def test_rounds_selections_pending_and_persistence(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as db:
        db.upsert_images([img("a"), img("b")])
        db.record_round(
            RoundRecord(1, "bald", 2, 20, 0, 100, "/ws/round-001", 5.0, None, 1.5),
            [
                Selection(1, "a", 1, "001_a.png", 0.9, "normal", (0.6, 0.4)),
                Selection(1, "b", 2, "002_b.png", 0.5, "pneumonia", (0.1, 0.9)),
            ],
        )
        assert db.pending_image_ids() == {"a", "b"}
        db.record_ingest(1, [LabelRecord("a", "normal", 1, "labels.csv", None, None, 6.0)], 6.0)
    with Ledger(path) as db:  # reopened from disk
        assert db.pending_image_ids() == set()
        assert db.round(1).ingested_at == 6.0
        sel = db.selections(1)
        assert [s.file for s in sel] == ["001_a.png", "002_b.png"]
        assert sel[1].probs == (0.1, 0.9)


def test_models_and_metrics(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as db:
        db.record_model(0, "/ck/0.pt", None, 20, 50, 3.0, {"test": {"auroc": 0.8}})
        db.record_model(1, "/ck/1.pt", 0, 40, 50, 2.0, {"test": {"auroc": 0.9}})
        assert db.latest_model() == ModelRecord(
            1, "/ck/1.pt", 0, 40, 50, 2.0, db.latest_model().created_at
        )
        assert [m.parent for m in db.models()] == [None, 0]
        assert db.metrics() == {0: {"test": {"auroc": 0.8}}, 1: {"test": {"auroc": 0.9}}}


def test_meta_value_is_stored_once(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as db:
        assert db.meta_value("secret", "first") == "first"
        assert db.meta_value("secret", "second") == "first"


def test_a_version_2_ledger_gains_label_comments(tmp_path):
    """A ledger written before labels had comments keeps its labels (comment None) and records
    comments afterwards."""
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '2');
        CREATE TABLE labels (seq INTEGER PRIMARY KEY AUTOINCREMENT, image_id TEXT NOT NULL,
            label TEXT NOT NULL, round INTEGER NOT NULL, source TEXT NOT NULL, annotator TEXT,
            origin TEXT, created_at REAL NOT NULL);
        INSERT INTO labels(image_id, label, round, source, annotator, origin, created_at)
            VALUES ('a', 'normal', 0, 'initial', NULL, 'x', 1.0);
    """)
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        ledger.add_labels(
            [LabelRecord("b", "pneumonia", 1, "labels.csv", None, "y", 2.0, "check the apex")]
        )
        got = [(r.image_id, r.comment) for r in ledger.labels()]
    assert got == [("a", None), ("b", "check the apex")]
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "3"
    raw.close()
