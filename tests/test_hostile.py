"""Hostile folders and files, driven through the CLI (issue 13).

Each attack was once a traceback or a silent wrong outcome. Each refusal here must give an exit
code != 0, one error line naming the file or key (an ingest adds one line per problem found),
and leave the workspace byte-identical: the ledger file and every file and link under
``labelling/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image, save, write_config
from medal.cli import main
from medal.config import load_config
from medal.scan import scan_source
from medal.workspace import Workspace
from test_labelling_export import export, files

ROOT = Path(__file__).parents[1]


def snapshot(ws: Path) -> dict[str, bytes | str]:
    """Bytes of the ledger and of everything under labelling/ (links by their target)."""
    out: dict[str, bytes | str] = {}
    for p in sorted([ws / "ledger.sqlite", *(ws / "labelling").rglob("*")]):
        key = p.relative_to(ws).as_posix()
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        elif p.exists():
            out[key] = p.read_bytes()
    return out


def refuse(argv: list[str], capsys, ws: Path, names: str, problems: int | None = 1) -> str:
    """Run the CLI; assert a clean refusal naming ``names`` (regex); return stderr."""
    before = snapshot(ws) if ws.exists() else None
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in err and out == ""
    lines = err.rstrip("\n").splitlines()
    assert lines[0].startswith(f"medal {argv[0]}: error: ")
    if problems is not None:
        assert len(lines) == 1 + problems, err  # the message line, then one line per problem
    assert re.search(names, err), err
    if before is None:
        assert not ws.exists()  # nothing was created
    else:
        assert snapshot(ws) == before
    return err


@pytest.fixture
def round_folder(tiny_config):
    """An exported round-001 of 4 images and the CLI arguments for its workspace."""
    folder, _ = export(tiny_config)
    return folder, ["-c", str(tiny_config.path)], tiny_config.workspace


# --- config: class names that break every export -----------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "labels.csv",
        "index.html",
        "README.txt",
        "x" * 256,
        "a:b",
        "a?b",
        "CON",
        "lpt1",
        "trailing.",
        "..",
        "tab\there",
    ],
)
def test_class_name_refused_before_anything_is_written(tmp_path, tiny_data, capsys, name):
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('"pneumonia"', json.dumps(name)))
    refuse(
        ["train", "-c", str(cfg)],
        capsys,
        tmp_path / "ws",
        r"'classes': .* cannot be a "
        r"class name",
        problems=0,
    )


# --- ingest: labels files --------------------------------------------------------------------
def test_renamed_labels_csv(round_folder, capsys):
    folder, c, ws = round_folder
    (folder / "labels.csv").rename(folder / "Labels.CSV")
    (folder / "labels.xlsx").write_bytes(b"PK\x03\x04")
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels\.csv not found in .*round-001; found Labels\.CSV, labels\.xlsx",
    )


def test_labels_csv_is_a_folder(round_folder, capsys):
    folder, c, ws = round_folder
    (folder / "labels.csv").unlink()
    (folder / "labels.csv").mkdir()
    refuse(["ingest", *c, str(folder)], capsys, ws, r"labels\.csv: is a folder")


def test_labels_csv_linked_to_a_system_file(round_folder, capsys, tmp_path):
    folder, c, ws = round_folder
    system = tmp_path / "shadow"
    system.write_text("root:$6$SECRETHASH:19000:0:99999:7:::\n")
    (folder / "labels.csv").unlink()
    os.symlink(system, folder / "labels.csv")
    err = refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels\.csv: is a link to a file outside the round folder",
    )
    assert "SECRETHASH" not in err


def test_swapped_image_in_class_folder_while_csv_agrees(round_folder, capsys, tmp_path):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels.csv").write_text(f"file,label\n{n[0]},normal\n{n[1]},normal\n")
    shutil.move(folder / n[0], folder / "normal" / n[0])
    (folder / n[1]).unlink()
    os.symlink(tmp_path / "shadow", folder / "normal" / n[1])
    (tmp_path / "shadow").write_text("secret\n")
    shutil.copy(folder / n[2], folder / "normal" / n[0])  # a different image under n[0]'s name
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        rf"normal/{n[0]}: the image file changed(.|\n)*normal/{n[1]}: is a link to a file "
        rf"outside",
        problems=2,
    )


def test_oversized_cell_in_labels_csv(round_folder, capsys):
    folder, c, ws = round_folder
    n = files(folder)
    (folder / "labels.csv").write_text(f"file,label\n{n[0]},normal{'x' * 150_000}\n")
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels\.csv: line 2: cannot read the CSV: a cell is longer than 128 KiB",
    )


def test_stray_quote_in_labels_csv(round_folder, capsys):
    folder, c, ws = round_folder
    n = files(folder)
    rows = "".join(f"{x},normal\n" for x in n[1:])
    (folder / "labels.csv").write_text(f'file,label\n"{n[0]},normal\n{rows}')
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels\.csv line 2: a cell runs over several lines; a stray quote",
    )


def test_utf16_labels_csv_without_bom(round_folder, capsys):
    folder, c, ws = round_folder
    (folder / "labels.csv").write_bytes("file\tlabel\n".encode("utf-16-le"))
    refuse(
        ["ingest", *c, str(folder)],
        capsys,
        ws,
        r"labels\.csv: the file has NUL bytes .*save it as UTF-8",
    )


def test_huge_labels_csv_lists_50_problems(round_folder, capsys):
    folder, c, ws = round_folder
    with open(folder / "labels.csv", "w") as f:
        f.write("file,label\n")
        f.writelines(f"wrong_{i}.png,normal\n" for i in range(20_000))
    err = refuse(
        ["ingest", *c, str(folder)], capsys, ws, r"labels\.csv line 2: 'wrong_0\.png'", problems=51
    )
    assert "20000 problem(s)" in err and err.rstrip().endswith("... and 19950 more")


# --- data.labelled as a CSV ------------------------------------------------------------------
def labelled_csv(tmp_path: Path, text: str, encoding: str) -> Path:
    rows = [f"labelled/{c}/l{i}.png,{c}" for c in ("normal", "pneumonia") for i in range(4)]
    path = tmp_path / "data" / "labels_list.csv"
    path.write_bytes(("file,label,comment\n" + "\n".join(rows) + text).encode(encoding))
    return path


@pytest.mark.parametrize(
    "text, encoding, names",
    [
        (
            f"\nlabelled/normal/l0.png,normal,{'x' * 200_000}",
            "utf-8",
            r"labels_list\.csv: line 10: cannot read the CSV: a cell is longer than 128 KiB",
        ),
        (
            '\n"labelled/normal/l0.png,normal,\n' * 3,
            "utf-8",
            r"labels_list\.csv: line 10: a cell runs over several lines",
        ),
        ("", "utf-16-le", r"labels_list\.csv: the file has NUL bytes"),
    ],
)
def test_hostile_labelled_csv(round_folder, tmp_path, capsys, text, encoding, names):
    _, c, ws = round_folder
    path = labelled_csv(tmp_path, text, encoding)
    refuse(
        ["train", *c, "--set", f"data.labelled={json.dumps(str(path))}"],
        capsys,
        ws,
        names,
        problems=None,
    )


@pytest.mark.parametrize("encoding", ["cp1252", "utf-16", "utf-8-sig", "utf-8"])
def test_labelled_csv_in_what_excel_writes_is_read(tmp_path, tiny_data, encoding):
    path = labelled_csv(tmp_path, "\nlabelled/normal/l0.png,normal,épanchement", encoding)
    if encoding == "utf-16":  # Excel's "Unicode Text": tab-separated
        path.write_bytes(path.read_bytes().decode("utf-16").replace(",", "\t").encode("utf-16"))
    got = scan_source(path, ["normal", "pneumonia"])
    assert len(got) == 9 and {e.label for e in got} == {"normal", "pneumonia"}


# --- export: names from the detected format ---------------------------------------------------
def test_exported_names_never_copy_a_hostile_suffix(tmp_path, tiny_data, capsys):
    pool = tmp_path / "hostile_pool"
    rng = np.random.default_rng(3)
    for i in range(3):
        save(pool / f"x{i}.<img src=x onerror=alert(1)>", make_image(i % 2, rng), as_dicom=True)
        Image.fromarray(make_image(i % 2, rng)).save(pool / f"y{i}.tiff", format="PNG")
    cfg = write_config(tmp_path)
    c = [
        "-c",
        str(cfg),
        "-q",
        "--set",
        f"data.pool={json.dumps(str(pool))}",
        "--set",
        "train.epochs=1",
        "--set",
        "train.min_steps=1",
    ]
    assert main(["train", *c]) == 0
    assert main(["query", *c]) == 0
    folder = load_config(cfg).workspace / "labelling" / "round-001"
    names = files(folder)
    assert len(names) == 6
    assert all(re.fullmatch(r"\d{3}_[0-9a-f]{12}\.(dcm|png)", n) for n in names), names
    assert sorted(p.name for p in folder.iterdir() if "<" in p.name) == []


def broken_dicom(path: Path, rng: np.random.Generator, how: str) -> Path:
    """A DICOM medal decodes and scores, with one attribute de-identification cannot handle
    (placed before the pixel data): ``fd`` TableFeedPerRotation (0018,9310), FD, 3 bytes (not
    a multiple of 8); ``sq`` ReferencedStudySequence (0008,1110) whose 5 bytes are no item."""
    save(path, make_image(1, rng), as_dicom=True)
    raw = path.read_bytes()
    at = raw.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, little endian
    elem = (
        b"\x18\x00\x10\x93FD\x03\x00\x01\x02\x03"
        if how == "fd"
        else b"\x08\x00\x10\x11SQ\x00\x00\x05\x00\x00\x00\x01\x02\x03\x04\x05"
    )
    path.write_bytes(raw[:at] + elem + raw[at:])
    return path


@pytest.mark.parametrize("how", ["fd", "sq"])
def test_failed_deidentification_leaves_no_round(tmp_path, tiny_data, capsys, how):
    """De-identification fails on the second of three exported files: the command stops with
    one line naming the file, the temporary round folder is removed and no round is
    recorded, so the next query starts clean."""
    pool = tmp_path / "small_pool"
    rng = np.random.default_rng(5)
    for i in (0, 2):
        save(pool / f"ok{i}.dcm", make_image(i % 2, rng), as_dicom=True)
    broken_dicom(pool / "bad1.dcm", rng, how)
    cfg = write_config(tmp_path)
    c = [
        "-c",
        str(cfg),
        "-q",
        "--set",
        f"data.pool={json.dumps(str(pool))}",
        "--set",
        "labelling.deidentify=true",
        "--set",
        "query.strategy=random",
    ]
    assert main(["train", *c, "--set", "train.epochs=1", "--set", "train.min_steps=1"]) == 0
    capsys.readouterr()
    ws = tmp_path / "ws"
    with Workspace(load_config(cfg)) as w:
        w.secret()  # made once per workspace, on its first de-identified export
    refuse(["query", *c], capsys, ws, r"bad1\.dcm: cannot write a de-identified copy", problems=0)
    assert sorted(p.name for p in (ws / "labelling").iterdir()) == []
    with Workspace(load_config(cfg)) as w:
        assert w.db.rounds() == []


# --- output -----------------------------------------------------------------------------------
def test_closed_stdout_pipe_ends_quietly(tmp_path, tiny_data):
    """`medal train ... | head`: the reader goes away; no BrokenPipeError traceback."""
    cfg = write_config(tmp_path)
    r, w = os.pipe()
    os.close(r)  # nobody reads stdout
    try:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "medal",
                "train",
                "-q",
                "-c",
                str(cfg),
                "--set",
                "train.epochs=1",
                "--set",
                "train.min_steps=1",
            ],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
    finally:
        os.close(w)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
