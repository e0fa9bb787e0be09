"""A new project's first round (issue 26): empty ``labelled/<class>/`` folders are zero labels,
and the query's "next:" lines lead to the labelling page."""

from __future__ import annotations

import shutil

import pytest
from conftest import write_config

from medal.cli import main
from medal.config import load_config
from medal.errors import DataError
from medal.workspace import Workspace
from medal.sources import sync


def empty_class_folders(root) -> None:
    """labelled/normal/ and labelled/pneumonia/ exist but hold no image (a new project)."""
    shutil.rmtree(root / "labelled")
    for c in ("normal", "pneumonia"):
        (root / "labelled" / c).mkdir(parents=True)


def test_empty_class_folders_are_zero_labels_with_a_note(tmp_path, tiny_data):
    empty_class_folders(tiny_data["root"])
    cfg = load_config(write_config(tmp_path))
    with Workspace(cfg) as ws:
        snap = sync(ws)
    assert snap.labelled == [] and len(snap.pool) == 40
    assert [n for n in snap.notes if "no labelled image yet" in n and "are empty" in n], snap.notes
    # the evaluation sets keep their check: an empty validation folder is still an error
    shutil.rmtree(tiny_data["root"] / "validation")
    for c in ("normal", "pneumonia"):
        (tiny_data["root"] / "validation" / c).mkdir(parents=True)
    with Workspace(cfg) as ws, pytest.raises(DataError, match="no images found in class"):
        sync(ws)


def test_the_first_round_of_a_new_project_starts_from_empty_class_folders(
    tmp_path, tiny_data, capsys, monkeypatch
):
    empty_class_folders(tiny_data["root"])
    monkeypatch.chdir(tmp_path)  # the commands printed are relative to here
    c = ["-c", str(write_config(tmp_path, "")), "-q"]
    assert main(["train", *c]) == 2  # nothing to train on: one line, not a traceback
    err = capsys.readouterr().err.strip()
    assert "no labelled images found in" in err and len(err.splitlines()) == 1
    c += [
        "--set",
        "representation.method=simclr",
        "--set",
        "representation.epochs=1",
        "--set",
        "representation.batch_size=16",
        "--set",
        "train.freeze_backbone=true",
    ]
    assert main(["query", *c]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "chosen by typiclust:zero-label from a pool of 40" in out
    assert "note: no labelled image yet: the class folders in" in out
    # the next step names the labelling page first, then the other ways and ingest
    assert (
        "next: label the images on the labelling page:\n"
        "  medal labels serve -c medal.toml ws/labelling/round-001\n"
        "  (or fill ws/labelling/round-001/labels.csv, or sort the images into its class "
        "folders), then\n  medal ingest -c medal.toml ws/labelling/round-001"
    ) in out
    readme = (tmp_path / "ws" / "labelling" / "round-001" / "README.txt").read_text()
    assert "medal labels serve" in readme
