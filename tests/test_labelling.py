"""Export and ingest on a real workspace (real SQLite, real files)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from medal.data import file_sha256
from medal.errors import LabellingError
from medal.labelling import Candidate, export_round, ingest_round, neutralise
from medal.workspace import Workspace


def export(cfg, n=4):
    with Workspace(cfg) as ws:
        snap = ws.sync()
        chosen = [Candidate(it, 1.0 / (i + 1), np.array([0.3, 0.7]))
                  for i, it in enumerate(snap.pool[:n])]
        folder = export_round(ws, ws.next_round(), chosen, strategy="bald", model_round=0,
                              pool_size=len(snap.pool), score_seconds=0.1)
        return folder, len(snap.pool)


def ledger_dump(cfg):
    with Workspace(cfg) as ws:
        return ([(r.image_id, r.label, r.round, r.source) for r in ws.db.labels()],
                [(r.round, r.ingested_at) for r in ws.db.rounds()])


def write_labels(folder: Path, rows, header=("file", "label"), delimiter=",", bom=False,
                 newline="\n"):
    text = delimiter.join(header) + newline + "".join(
        delimiter.join(r) + newline for r in rows)
    (folder / "labels.csv").write_bytes((("\ufeff" if bom else "") + text).encode())


def files(folder: Path) -> list[str]:
    with open(folder / "labels.csv", newline="") as f:
        return [r["file"] for r in csv.DictReader(f)]


def test_export_writes_folder_and_keeps_sources(tiny_config, tiny_data):
    before = {p: p.read_bytes() for p in (tiny_data["root"] / "pool").rglob("*") if p.is_file()}
    folder, pool_size = export(tiny_config)
    assert folder.name == "round-001"
    names = files(folder)
    assert len(names) == 4
    for name in names:
        assert (folder / name).is_file()
    assert (folder / "normal").is_dir() and (folder / "pneumonia").is_dir()
    assert "pneumonia" in (folder / "README.txt").read_text()
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "image_id", "source_path", "rank", "score", "predicted",
                             "p_normal", "p_pneumonia"]
    for r in rows:
        assert file_sha256(folder / r["file"]) == r["image_id"]
        assert file_sha256(Path(r["source_path"])) == r["image_id"]
        assert r["predicted"] == "pneumonia"
    dicoms = [n for n in names if n.endswith(".dcm")]
    after = {p: p.read_bytes() for p in (tiny_data["root"] / "pool").rglob("*") if p.is_file()}
    assert before == after  # sources untouched
    with Workspace(tiny_config) as ws:  # exported images leave the pool until ingested
        assert len(ws.sync().pool) == pool_size - 4
    assert all((folder / d).stat().st_size > 128 for d in dicoms)


def test_ingest_records_labels_once(tiny_config):
    folder, pool_size = export(tiny_config)
    names = files(folder)
    write_labels(folder, [(names[0], "normal"), (names[1], "Pneumonia "), (names[2], ""),
                          (names[3], "")])
    with Workspace(tiny_config) as ws:
        r = ingest_round(ws, folder)
    assert r.labelled == {"normal": 1, "pneumonia": 1} and r.returned_to_pool == 2
    dump = ledger_dump(tiny_config)
    with Workspace(tiny_config) as ws:
        r2 = ingest_round(ws, folder)
        snap = ws.sync()
    assert r2.already_ingested
    assert ledger_dump(tiny_config) == dump  # second ingest changed nothing
    assert len(snap.pool) == pool_size - 2  # unlabelled rows are back in the pool
    assert len(snap.labelled) == 8 + 2


def test_bad_labels_file_lists_every_problem_and_writes_nothing(tiny_config):
    folder, _ = export(tiny_config)
    names = files(folder)
    before = ledger_dump(tiny_config)
    write_labels(folder, [(names[0], "pneumonai"), (names[1], "normal"), (names[1], "normal"),
                          ("not_exported.png", "normal"), ("../../etc/passwd", "normal"),
                          (names[2], "normal")])
    shutil.copy(folder / names[2], folder / "pneumonia" / names[2])  # CSV and folder disagree
    with Workspace(tiny_config) as ws:
        with pytest.raises(LabellingError) as e:
            ingest_round(ws, folder)
    msg = str(e.value)
    assert "line 2" in msg and "'pneumonai'" in msg and "allowed: normal, pneumonia" in msg
    assert "line 4" in msg and "listed again" in msg
    assert "line 5" in msg and "not an image exported" in msg
    assert "line 6" in msg and "outside the round folder" in msg
    assert names[2] in msg and "pneumonia/" in msg
    assert len(e.value.problems) == 5
    assert ledger_dump(tiny_config) == before


def test_excel_style_csv_and_class_folders(tiny_config):
    folder, _ = export(tiny_config)
    names = files(folder)
    write_labels(folder, [(names[1], "NORMAL", "dr x", "ok"), (names[0], "", "", ""),
                          (names[2], "unsure", "dr x", "")],
                 header=("File", "Label", "annotator", "comment"), delimiter=";", bom=True,
                 newline="\r\n")
    shutil.move(folder / names[0], folder / "pneumonia" / names[0])  # dragged into a folder
    with Workspace(tiny_config) as ws:
        r = ingest_round(ws, folder)
        recs = {x.origin: x for x in ws.db.labels(1)}
    assert r.labelled == {"normal": 1, "pneumonia": 1, "unsure": 1}
    assert recs["labels.csv:2"].annotator == "dr x"
    assert recs[f"pneumonia/{names[0]}"].source == "folder"


def test_changed_image_is_refused(tiny_config):
    folder, _ = export(tiny_config)
    names = files(folder)
    with open(folder / names[0], "ab") as f:
        f.write(b"edited")
    write_labels(folder, [(names[0], "normal")])
    with Workspace(tiny_config) as ws:
        with pytest.raises(LabellingError, match="changed since it was exported"):
            ingest_round(ws, folder)


def test_changed_labels_after_ingest_are_refused(tiny_config):
    folder, _ = export(tiny_config)
    names = files(folder)
    write_labels(folder, [(names[0], "normal")])
    with Workspace(tiny_config) as ws:
        ingest_round(ws, folder)
    write_labels(folder, [(names[0], "pneumonia")])
    with Workspace(tiny_config) as ws:
        with pytest.raises(LabellingError, match="already ingested.*changed"):
            ingest_round(ws, folder)


def test_unknown_round_folder(tiny_config, tmp_path):
    with Workspace(tiny_config) as ws:
        with pytest.raises(LabellingError, match="not a round folder"):
            ingest_round(ws, tmp_path)
        (tmp_path / "round-009").mkdir()
        with pytest.raises(LabellingError, match="never exported"):
            ingest_round(ws, tmp_path / "round-009")


def test_neutralise():
    assert neutralise("=cmd()") == "'=cmd()"
    assert neutralise("-0.25") == "-0.25"
    assert neutralise("a.png") == "a.png"
