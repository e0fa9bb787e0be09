"""Export and ingest on a real workspace (real SQLite, real files)."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image, save, write_config
from medal.config import load_config
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


# --- hostile folders and files (issue 13) --------------------------------------------------
def refused(cfg, folder, match):
    """Ingest fails with ``match`` and the ledger is unchanged; returns the error."""
    before = ledger_dump(cfg)
    with Workspace(cfg) as ws:
        with pytest.raises(LabellingError, match=match) as e:
            ingest_round(ws, folder)
    assert ledger_dump(cfg) == before
    return e.value


@pytest.mark.parametrize("found", [["Labels.CSV", "labels.xlsx"], ["labels (1).csv"], []])
def test_missing_labels_csv_is_an_error_naming_what_was_found(tiny_config, found):
    folder, _ = export(tiny_config)
    names = files(folder)
    text = (folder / "labels.csv").read_text().replace(f"{names[0]},", f"{names[0]},normal")
    (folder / "labels.csv").unlink()
    for f in found:
        (folder / f).write_text(text)
    what = f"found {', '.join(found)}" if found else "found no other labels file"
    err = refused(tiny_config, folder, rf"labels\.csv not found in {folder}; {re.escape(what)}")
    assert len(err.problems) == 1
    # the deliberate way to hand a round back unlabelled still works
    (folder / "labels.csv").write_text("file,label\n")
    with Workspace(tiny_config) as ws:
        r = ingest_round(ws, folder)
    assert r.labelled == {} and r.returned_to_pool == 4


def test_labels_csv_that_is_a_folder_is_an_error(tiny_config):
    folder, _ = export(tiny_config)
    names = files(folder)
    (folder / "labels.csv").unlink()
    (folder / "labels.csv").mkdir()
    (folder / "labels.csv" / "labels.csv").write_text(f"file,label\n{names[0]},normal\n")
    err = refused(tiny_config, folder, r"labels\.csv: is a folder, not a file")
    assert len(err.problems) == 1
    shutil.move(folder / names[1], folder / "normal" / names[1])  # class moves do not excuse it
    refused(tiny_config, folder, r"labels\.csv: is a folder, not a file")


@pytest.mark.parametrize("name", ["labels.csv", "labels_bob.csv"])
def test_labels_file_linked_outside_is_refused_unread(tiny_config, tmp_path, name):
    folder, _ = export(tiny_config)
    secret = tmp_path / "secret.csv"
    secret.write_text("TOP-SECRET-LINE,x\n")
    if (folder / name).exists():
        (folder / name).unlink()
    os.symlink(secret, folder / name)
    err = refused(tiny_config, folder, rf"{name}: is a link to a file outside the round folder")
    assert "TOP-SECRET" not in str(err)


def test_class_folder_entries_are_checked_even_when_labels_csv_agrees(tiny_config, tmp_path):
    folder, _ = export(tiny_config)
    names = files(folder)
    write_labels(folder, [(names[0], "normal"), (names[1], "normal")])
    shutil.move(folder / names[0], folder / "normal" / names[0])
    shutil.move(folder / names[1], folder / "normal" / names[1])
    # an image replaced by a different image, another by a link to a file outside
    shutil.copy(folder / names[2], folder / "normal" / names[0])
    outside = tmp_path / "passwd"
    outside.write_text("root:x:0:0\n")
    (folder / "normal" / names[1]).unlink()
    os.symlink(outside, folder / "normal" / names[1])
    err = refused(tiny_config, folder, "changed since it was exported")
    msg = str(err)
    assert f"normal/{names[0]}: the image file changed" in msg
    assert f"normal/{names[1]}: is a link to a file outside the round folder" in msg
    assert "root:x" not in msg


def test_manifest_predicted_class_is_neutralised(tmp_path, tiny_data):
    for split in ("labelled", "validation"):
        (tiny_data["root"] / split / "pneumonia").rename(tiny_data["root"] / split / "=1+1")
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('"pneumonia"', '"=1+1"'))
    cfg = load_config(path)
    folder, _ = export(cfg)  # probabilities [0.3, 0.7]: predicted "=1+1"
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["predicted"] for r in rows} == {"'=1+1"}


def test_exported_names_take_the_suffix_of_the_detected_format(tmp_path, tiny_data):
    pool = tmp_path / "hostile_pool"
    rng = np.random.default_rng(1)
    save(pool / "x.<img src=x onerror=alert(1)>", make_image(0, rng), as_dicom=True)
    Image.fromarray(make_image(1, rng)).save(pool / "y.jpeg", format="PNG")  # misnamed
    Image.fromarray(make_image(1, rng)).save(pool / "z.TIFF", format="JPEG")
    cfg = load_config(write_config(tmp_path), {"data.pool": str(pool)})
    folder, _ = export(cfg, n=3)
    names = sorted(files(folder))
    assert sorted(Path(n).suffix for n in names) == [".dcm", ".jpg", ".png"]
    assert all(re.fullmatch(r"\d{3}_[0-9a-f]{12}\.(dcm|png|jpg)", n) for n in names), names
    with Workspace(cfg) as ws:  # the exported copies are still the source bytes
        sel = ws.db.selections(1)
    assert all(file_sha256(folder / s.file) == s.sha256 for s in sel)


def test_oversized_field_and_stray_quote_are_one_line_problems(tiny_config):
    folder, _ = export(tiny_config)
    names = files(folder)
    (folder / "labels.csv").write_text(f"file,label,comment\n{names[0]},normal,"
                                       f"{'x' * 200_000}\n")
    err = refused(tiny_config, folder,
                  r"labels\.csv: line 2: cannot read the CSV: a cell is longer than 128 KiB; "
                  r"usually a stray quote")
    assert len(err.problems) == 1
    (folder / "labels.csv").write_text(f'file,label\n"{names[0]},normal\n{names[1]},normal\n')
    err = refused(tiny_config, folder, r"labels\.csv line 2: a cell runs over several lines")
    assert len(str(err)) < 500  # the swallowed rows are not echoed


@pytest.mark.parametrize("encoding, delimiter", [("utf-16", "\t"), ("utf-16", ","),
                                                 ("cp1252", ";"), ("utf-8-sig", ",")])
def test_labels_csv_in_what_spreadsheets_write(tiny_config, encoding, delimiter):
    folder, _ = export(tiny_config)
    names = files(folder)
    text = (f"file{delimiter}label{delimiter}comment\n"
            f"{names[0]}{delimiter}normal{delimiter}épanchement\n"
            f"{names[1]}{delimiter}Pneumonia{delimiter}\n")
    (folder / "labels.csv").write_bytes(text.encode(encoding))  # utf-16: with BOM, as Excel
    with Workspace(tiny_config) as ws:
        r = ingest_round(ws, folder)
    assert r.labelled == {"normal": 1, "pneumonia": 1}


def test_utf16_without_bom_names_the_encoding_wanted(tiny_config):
    folder, _ = export(tiny_config)
    (folder / "labels.csv").write_bytes("file,label\n".encode("utf-16-le"))
    refused(tiny_config, folder, r"labels\.csv: the file has NUL bytes \(UTF-16 without a "
                                 r"byte-order mark.*save it as UTF-8")


def test_many_problems_are_capped(tiny_config):
    folder, _ = export(tiny_config)
    with open(folder / "labels.csv", "w") as f:
        f.write("file,label\n")
        for i in range(3000):
            f.write(f"nope_{i}.png,normal\n")
    err = refused(tiny_config, folder, r"3000 problem\(s\); nothing was recorded")
    assert len(err.problems) == 51
    assert err.problems[0].startswith("labels.csv line 2: 'nope_0.png' is not an image")
    assert err.problems[-1] == "... and 2950 more"
    assert len(str(err).splitlines()) == 52
