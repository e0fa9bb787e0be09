"""medal.labelling.ingest on a real workspace (real SQLite, real files)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from medal.errors import LabellingError
from medal.labelling.ingest import ingest_round
from medal.workspace import Workspace
from test_labelling_export import export, files
from medal.sources import sync


def ledger_dump(cfg):
    with Workspace(cfg) as ws:
        return (
            [(r.image_id, r.label, r.round, r.source) for r in ws.db.labels()],
            [(r.round, r.ingested_at) for r in ws.db.rounds()],
        )


def write_labels(
    folder: Path, rows, header=("file", "label"), delimiter=",", bom=False, newline="\n"
):
    text = delimiter.join(header) + newline + "".join(delimiter.join(r) + newline for r in rows)
    (folder / "labels.csv").write_bytes((("\ufeff" if bom else "") + text).encode())


def test_ingest_records_labels_once(tiny_config):
    folder, pool_size = export(tiny_config)
    names = files(folder)
    write_labels(
        folder, [(names[0], "normal"), (names[1], "Pneumonia "), (names[2], ""), (names[3], "")]
    )
    with Workspace(tiny_config) as ws:
        r = ingest_round(ws, folder)
    assert r.labelled == {"normal": 1, "pneumonia": 1} and r.returned_to_pool == 2
    dump = ledger_dump(tiny_config)
    with Workspace(tiny_config) as ws:
        r2 = ingest_round(ws, folder)
        snap = sync(ws)
    assert r2.already_ingested
    assert ledger_dump(tiny_config) == dump  # second ingest changed nothing
    assert len(snap.pool) == pool_size - 2  # unlabelled rows are back in the pool
    assert len(snap.labelled) == 8 + 2


def test_bad_labels_file_lists_every_problem_and_writes_nothing(tiny_config):
    folder, _ = export(tiny_config)
    names = files(folder)
    before = ledger_dump(tiny_config)
    write_labels(
        folder,
        [
            (names[0], "pneumonai"),
            (names[1], "normal"),
            (names[1], "normal"),
            ("not_exported.png", "normal"),
            ("../../etc/passwd", "normal"),
            (names[2], "normal"),
        ],
    )
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
    write_labels(
        folder,
        [
            (names[1], "NORMAL", "dr x", "ok"),
            (names[0], "", "", ""),
            (names[2], "unsure", "dr x", ""),
        ],
        header=("File", "Label", "annotator", "comment"),
        delimiter=";",
        bom=True,
        newline="\r\n",
    )
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
    # the deliberate way to hand a round back unlabelled still works, once no other labels
    # file is left in the folder (their labels would be lost)
    (folder / "labels.csv").write_text("file,label\n")
    if found:
        refused(
            tiny_config,
            folder,
            rf"nothing to record: labels\.csv has only its header; "
            rf"{re.escape(what)}\. .*move the other files out",
        )
        for f in found:
            (folder / f).unlink()
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


def test_oversized_field_and_stray_quote_are_one_line_problems(tiny_config):
    folder, _ = export(tiny_config)
    names = files(folder)
    (folder / "labels.csv").write_text(f"file,label,comment\n{names[0]},normal,{'x' * 200_000}\n")
    err = refused(
        tiny_config,
        folder,
        r"labels\.csv: line 2: cannot read the CSV: a cell is longer than 128 KiB; "
        r"usually a stray quote",
    )
    assert len(err.problems) == 1
    (folder / "labels.csv").write_text(f'file,label\n"{names[0]},normal\n{names[1]},normal\n')
    err = refused(tiny_config, folder, r"labels\.csv line 2: a cell runs over several lines")
    assert len(str(err)) < 500  # the swallowed rows are not echoed


@pytest.mark.parametrize(
    "encoding, delimiter", [("utf-16", "\t"), ("utf-16", ","), ("cp1252", ";"), ("utf-8-sig", ",")]
)
def test_labels_csv_in_what_spreadsheets_write(tiny_config, encoding, delimiter):
    folder, _ = export(tiny_config)
    names = files(folder)
    text = (
        f"file{delimiter}label{delimiter}comment\n"
        f"{names[0]}{delimiter}normal{delimiter}épanchement\n"
        f"{names[1]}{delimiter}Pneumonia{delimiter}\n"
    )
    (folder / "labels.csv").write_bytes(text.encode(encoding))  # utf-16: with BOM, as Excel
    with Workspace(tiny_config) as ws:
        r = ingest_round(ws, folder)
    assert r.labelled == {"normal": 1, "pneumonia": 1}


def test_utf16_without_bom_names_the_encoding_wanted(tiny_config):
    folder, _ = export(tiny_config)
    (folder / "labels.csv").write_bytes("file,label\n".encode("utf-16-le"))
    refused(
        tiny_config,
        folder,
        r"labels\.csv: the file has NUL bytes \(UTF-16 without a "
        r"byte-order mark.*save it as UTF-8",
    )


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


def test_comments_are_recorded_with_their_labels_and_exported(tiny_config, tmp_path):
    """labels.csv's optional comment column (what the labelling page writes) reaches the
    ledger with the label it belongs to, and `medal labels export`."""
    import csv

    from medal.api import export_labels

    folder, _ = export(tiny_config)
    names = files(folder)
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(
            [
                ("file", "label", "comment"),
                (names[0], "normal", "possible nodule, left apex"),
                (names[1], "pneumonia", ""),
                (names[2], "", "too dark"),
            ]
        )
    with Workspace(tiny_config) as ws:
        ingest_round(ws, folder)
        rows = {r.origin: r for r in ws.db.labels(1)}
    assert rows["labels.csv:2"].comment == "possible nodule, left apex"
    assert rows["labels.csv:3"].comment is None
    out = tmp_path / "labels.csv"
    export_labels(tiny_config, out)
    exported = {r["origin"]: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    assert exported["labels.csv:2"]["comment"] == "possible nodule, left apex"
    assert exported["labels.csv:3"]["comment"] == ""
