"""A ledger whose database cannot grow: an ingest that fails part-way is rolled back whole
(issue 13).

SQLite's ``max_page_count`` pragma caps the database at its current size, so the ingest's
transaction fails with SQLITE_FULL ("database or disk is full") part-way through recording
the labels, as on a disk that fills at that moment, deterministically and without root. (A
really full disk, a filled tmpfs and ``RLIMIT_FSIZE``, is tested in
``test_hostile_files.py::test_disk_full_while_writing_the_ledger``.) Checked: one line naming
the workspace folder and the cause, the ledger's content identical and intact, no half-recorded
round, the round folder untouched, and the same ingest recording every label once room is made.
"""

from __future__ import annotations

import csv
import re
import sqlite3
from pathlib import Path

from conftest import write_config
from medal.cli import main
from medal.ledger import Ledger


def dump(path: Path) -> dict[str, list[str]]:
    """Every row of every table of the ledger at ``path`` (read by a separate connection)."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        db.close()


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_ingest_on_a_ledger_that_cannot_grow_is_rolled_back_whole(
    tmp_path, tiny_data, capsys, monkeypatch
):
    cfg = str(write_config(tmp_path))
    fast = ["--set", "train.epochs=1", "--set", "train.min_steps=1", "--set", "query.budget=40"]
    assert main(["train", "-q", "-c", cfg, *fast]) == 0
    assert main(["query", "-q", "-c", cfg, *fast]) == 0
    capsys.readouterr()
    ws = tmp_path / "ws"
    folder = ws / "labelling" / "round-001"
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        manifest = list(csv.DictReader(f))
    assert len(manifest) == 40
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "annotator"])
        for row in manifest:  # a long annotator name: the 40 labels need several new pages
            w.writerow([row["file"], tiny_data["truth"][row["source_path"]], "dr " + "x" * 400])
    ledger = ws / "ledger.sqlite"
    before, round_folder = dump(ledger), files(folder)

    inserted: list[str] = []
    real_init = Ledger.__init__

    def capped(self: Ledger, path: Path) -> None:
        """The ledger as medal opens it, then unable to grow past its current page count."""
        real_init(self, path)
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        self._db.execute(f"PRAGMA max_page_count = {pages}")
        self._db.set_trace_callback(
            lambda sql: inserted.append(sql) if sql.startswith("INSERT INTO labels") else None
        )

    monkeypatch.setattr(Ledger, "__init__", capped)
    code = main(["ingest", "-c", cfg, str(folder)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    lines = err.rstrip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(
        rf"medal ingest: error: no space left on {re.escape(str(ws))}: writing "
        r"ledger\.sqlite failed: SQLite: database or disk is full \(\d+ MB free\)",
        lines[0],
    ), lines[0]
    # it failed part-way: some of the 40 label rows were written, not all
    assert 1 <= len(inserted) < 40, len(inserted)
    assert dump(ledger) == before  # no label, no ingest time: nothing of the round recorded
    assert files(folder) == round_folder
    assert not list(ws.rglob("*.tmp"))

    monkeypatch.setattr(Ledger, "__init__", real_init)  # room again: the same ingest succeeds
    assert main(["ingest", "-c", cfg, str(folder)]) == 0, capsys.readouterr().err
    assert "recorded 40 labels" in capsys.readouterr().out
    with Ledger(ledger) as db:
        labels = db.labels(1)
        assert sorted(r.image_id for r in labels) == sorted(r["image_id"] for r in manifest)
        assert len(labels) == 40  # each once
        assert db.round(1).ingested_at is not None
