"""`medal ingest` on returned round folders whose labels were lost or recorded wrong (issue 26).

Each case drives the CLI in-process on a round folder made by a real export, with a real SQLite
ledger. A refusal must exit != 0 with one message line (plus one line per problem) naming the
file and line, and leave the ledger and the round folder byte-identical.
"""

from __future__ import annotations

import re

import pytest
from test_hostile import refuse
from test_labelling_export import export, files

from medal.cli import main
from medal.workspace import Workspace


@pytest.fixture
def round_folder(tiny_config):
    """An exported round-001 of 4 images, the CLI's -c arguments, the workspace folder."""
    folder, _ = export(tiny_config)
    return folder, ["-c", str(tiny_config.path)], tiny_config.workspace


def ingest(c: list[str], folder, capsys) -> str:
    """Run `medal ingest` expecting success; its standard output."""
    assert main(["ingest", *c, str(folder)]) == 0
    return capsys.readouterr().out


def rows_of(cfg_path, round_no: int = 1) -> list[tuple[str, str, str | None]]:
    from medal.config import load_config

    with Workspace(load_config(cfg_path)) as ws:
        return [(r.label, r.source, r.comment) for r in ws.db.labels(round_no)]


# --- broken CSV shapes -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "header, row, name, cols",
    [
        ("file,label,label", "{f},normal,pneumonia", "label", "2 and 3"),
        ("file,label,file", "{f},normal,{g}", "file", "1 and 3"),
        ("File,Label, LABEL ", "{f},normal,normal", "label", "2 and 3"),
        ("file,label,comment,Comment", "{f},normal,a,b", "comment", "3 and 4"),
    ],
)
def test_duplicate_columns_are_refused(round_folder, capsys, header, row, name, cols):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels.csv").write_text(f"{header}\n{row.format(f=n[0], g=n[1])}\n")
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        rf"labels\.csv line 1: column '{name}' appears 2 times \(columns {cols}\)",
    )


def test_row_with_more_cells_than_the_header_is_refused(round_folder, capsys):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels.csv").write_text(
        f"file,label,comment\n{n[1]},pneumonia,\n{n[0]},normal,rib, or nodule?\n"
    )
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels\.csv line 3: 4 cells but the header has 3 columns \(extra: ' or nodule\?'\)"
        r"; put a cell that holds a comma in double quotes",
    )
    # quoted, the whole comment is kept; empty extra cells (spreadsheets write them) lose nothing
    (folder / "labels.csv").write_text(
        f'file,label,comment\n{n[1]},pneumonia,,,\n{n[0]},normal,"rib, or nodule?"\n'
    )
    assert "recorded 2 labels" in ingest(c, folder, capsys)
    assert ("normal", "labels.csv", "rib, or nodule?") in rows_of(c[1])


def test_reader_file_with_a_ragged_row_is_refused(round_folder, capsys):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels_bob.csv").write_text(f"file,label\n{n[0]},normal,pneumonia\n")
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels_bob\.csv line 2: 3 cells but the "
        r"header has 2 columns \(extra: 'pneumonia'\)",
    )


@pytest.mark.parametrize(
    "text, match",
    [
        ("file,label,label\n{p},normal,pneumonia\n", r"line 1: column 'label' appears 2 times"),
        ("file,label\n{p},normal,pneumonia\n", r"line 2: 3 cells but the header has 2 columns"),
    ],
)
def test_labelled_csv_with_broken_shape_is_refused(tiny_data, tmp_path, text, match):
    from medal.errors import DataError
    from medal.scan import scan_source

    path = tmp_path / "data" / "labelled.csv"
    path.write_text(text.format(p="labelled/normal/l0.png"))
    with pytest.raises(DataError, match=match):
        scan_source(path, ["normal", "pneumonia"])
    path.write_text("file,label,,\nlabelled/normal/l0.png,normal,,\n")  # empty extras are fine
    assert [e.label for e in scan_source(path, ["normal", "pneumonia"])] == ["normal"]


# --- an untouched labels.csv must not close the round while the labels are elsewhere ---------
def filled(n: list[str], header: str = "file,label") -> str:
    return f"{header}\n{n[0]},normal\n{n[1]},pneumonia\n{n[2]},\n{n[3]},\n"


@pytest.mark.parametrize("saved_as", ["labels.xlsx", "labels (1).csv", "Labels.csv.txt"])
def test_untouched_labels_csv_with_the_labels_saved_elsewhere_is_refused(
    round_folder, capsys, saved_as
):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / saved_as).write_text(filled(n))  # the reader's save; labels.csv is the export
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        rf"nothing to record: labels\.csv has 4 row\(s\) and no label in them; found "
        rf"{re.escape(saved_as)}\. Save the labels in labels\.csv",
    )
    # the reader's labels copied into labels.csv are then recorded (not refused as a change)
    (folder / "labels.csv").write_text(filled(n))
    (folder / saved_as).unlink()
    assert "recorded 2 labels (normal 1, pneumonia 1)" in ingest(c, folder, capsys)


def test_untouched_labels_csv_alone_is_refused_and_the_header_alone_closes_the_round(
    round_folder, capsys
):
    folder, c, ws = round_folder
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels\.csv has 4 row\(s\) and no label in them; found no other labels file\. "
        r".*to hand the round back unlabelled, leave only the header line in labels\.csv$",
    )
    (folder / "labels.csv").write_text("file,label\n")  # the deliberate hand-back (README)
    (folder / "._labels.csv").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata: not labels
    assert "recorded 0 labels (none); 4 unlabelled image(s) returned to the pool" in ingest(
        c, folder, capsys
    )
    assert "already ingested" in ingest(c, folder, capsys)


@pytest.mark.parametrize("name", ["Labels_bob.csv", "labels_bob.CSV", "LABELS_bob.Csv"])
def test_reader_file_name_in_any_case_is_read(round_folder, capsys, name):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / name).write_text(filled(n))
    assert "recorded 2 labels (normal 1, pneumonia 1)" in ingest(c, folder, capsys)
    assert rows_of(c[1]).count(("normal", name, None)) == 1


@pytest.mark.parametrize(
    "name, fix",
    [
        ("labels-bob.csv", "rename it labels_bob.csv"),
        ("labels bob.csv", "rename it labels_bob.csv"),
        ("label_bob.csv", "rename it labels_bob.csv"),
        ("labels_bob.xlsx", "save it as CSV: labels_bob.csv"),
    ],
)
def test_near_miss_reader_file_is_refused_even_with_labels_elsewhere(
    round_folder, capsys, name, fix
):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels.csv").write_text(filled(n))
    (folder / name).write_text(filled(n).replace("normal", "pneumonia"))
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        rf"{re.escape(name)}: looks like a reader's labels file but is not read \(a reader's "
        rf"file is named labels_<name>\.csv\); {re.escape(fix)}, or move it out",
    )


def test_two_files_for_one_reader_are_refused(round_folder, capsys):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels_bob.csv").write_text(filled(n))
    (folder / "Labels_Bob.csv").write_text(filled(n).replace("normal", "pneumonia"))
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels_bob\.csv: a second labels file for reader 'bob' \(the other is "
        r"Labels_Bob\.csv\); keep one",
    )


def test_reader_files_without_a_label_do_not_close_the_round(round_folder, capsys):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels.csv").unlink()
    (folder / "labels_bob.csv").write_text(f"file,label\n{n[0]},\n")
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"nothing to record: labels\.csv not found, and labels_bob\.csv give\(s\) no label; "
        r"found no other labels file",
    )


# --- text encodings --------------------------------------------------------------------------
def test_labels_csv_mixing_utf8_and_cp1252_is_refused_naming_the_line(round_folder, capsys):
    """Read as Windows-1252, the UTF-8 line's 'café' was recorded as 'cafÃ©'."""
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels.csv").write_bytes(
        f"file,label,comment\n{n[0]},normal,café\n".encode()
        + f"{n[1]},pneumonia,épanchement\n".encode("cp1252")
    )
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels\.csv: line 3: not UTF-8 text, though line 2 is: the file mixes text "
        r"encodings; save it again as UTF-8",
    )
    # saved again as UTF-8 (no BOM), both comments are recorded as written
    (folder / "labels.csv").write_bytes(
        f"file,label,comment\n{n[0]},normal,café\n{n[1]},pneumonia,épanchement\n".encode()
    )
    assert "recorded 2 labels" in ingest(c, folder, capsys)
    comments = {r[2] for r in rows_of(c[1])}
    assert {"café", "épanchement"} <= comments


@pytest.mark.parametrize(
    "tail, line",
    [
        (b"\xed\xa0\xbd\xed\xb8\x80", 3),  # an emoji as two encoded surrogates (CESU-8)
        ("é".encode()[:1], 3),  # a UTF-8 character cut in two at the end of the file
    ],
)
def test_csv_with_broken_utf8_is_not_read_as_cp1252(tmp_path, tail, line):
    from medal.errors import DataError
    from medal.scan import csv_encoding

    path = tmp_path / "list.csv"
    path.write_bytes("file,label\ncafé.png,normal\nx.png,".encode() + tail)
    with pytest.raises(
        DataError,
        match=rf"list\.csv: line {line}: not UTF-8 text, though "
        rf"line 2 is",
    ):
        csv_encoding(path)
    path.write_bytes("file,label\ncafé.png,normal\n".encode("cp1252"))  # all cp1252: fine
    assert csv_encoding(path) == "cp1252"


# --- labels.csv against one reader -----------------------------------------------------------
def test_labels_csv_overriding_a_single_reader_is_said_and_recorded_as_adjudicated(
    round_folder, capsys
):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels_bob.csv").write_text(f"file,label\n{n[0]},normal\n{n[1]},pneumonia\n")
    (folder / "labels.csv").write_text(f"file,label\n{n[0]},pneumonia\n{n[1]},pneumonia\n")
    out = ingest(c, folder, capsys)
    assert "recorded 2 labels (pneumonia 2)" in out
    assert "1 disagreement(s) settled by the labels in labels.csv/folders" in out
    from medal.config import load_config

    with Workspace(load_config(c[1])) as ws_:
        rows = [(r.label, r.source, r.annotator, r.origin) for r in ws_.db.labels(1)]
    assert ("normal", "labels_bob.csv", "bob", "labels_bob.csv:2") in rows  # bob's label kept
    assert ("pneumonia", "adjudicated", None, "labels.csv:2") in rows  # n[0]: overrides bob
    assert ("pneumonia", "labels.csv", None, "labels.csv:3") in rows  # n[1]: bob agrees
    assert "already ingested" in ingest(c, folder, capsys)  # the adjudicated row is a final one


# --- medal status counts images, and readers' rows apart --------------------------------------
def test_status_counts_labelled_images_not_label_rows(round_folder, capsys):
    folder, c, ws = round_folder
    n = files(folder)
    for reader in ("alice", "bob"):  # two readers agree on 3 of the 4 images
        (folder / f"labels_{reader}.csv").write_text(
            filled(n).replace(f"{n[2]},", f"{n[2]},unsure")
        )
    (folder / "labels.csv").write_text(f"file,label\n{n[0]},pneumonia\n")  # overrides both
    assert "recorded 3 labels" in ingest(c, folder, capsys)
    assert main(["status", *c]) == 0
    out = capsys.readouterr().out
    table = out.splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("round  strategy"))
    assert table[head].split() == [
        "round",
        "strategy",
        "exported",
        "labelled",
        "readers",
        "pool",
        "model",
        "state",
    ]
    cells = table[head + 1].split()
    assert cells[:5] == ["1", "bald", "4", "3", "6"]  # 3 images; 2 readers x 3 rows
    assert "adjudicated 1" in out  # by source
    from medal import api
    from medal.config import load_config

    r = api.status(load_config(c[1])).rounds[0]
    assert (r["labelled"], r["reader_labels"]) == (3, 6)


def test_labels_after_a_hand_back_are_refused_saying_the_round_was_handed_back(
    round_folder, capsys
):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels.csv").write_text("file,label\n")
    ingest(c, folder, capsys)
    (folder / "labels.csv").write_text(filled(n))
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"round 1 was already ingested and its labels have changed since \(it was handed "
        r"back unlabelled, so its images went back to the pool: a later query can export "
        r"them again for these labels\); nothing was recorded",
        problems=2,
    )
