"""medal.labelling.export on a real workspace (real SQLite, real files)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import make_image, save, write_config
from medal.config import load_config
from medal.scan import file_sha256
from medal.labelling.export import Candidate, export_round, neutralise
from medal.workspace import Workspace, kept_manifest
from medal.sources import sync


def export(cfg, n=4, probs=(0.3, 0.7), score=lambda i: 1.0 / (i + 1)):
    with Workspace(cfg) as ws:
        snap = sync(ws)
        chosen = [Candidate(it, score(i), np.array(probs)) for i, it in enumerate(snap.pool[:n])]
        folder = export_round(
            ws,
            ws.next_round(),
            chosen,
            strategy="bald",
            model_round=0,
            pool_size=len(snap.pool),
            score_seconds=0.1,
        )
        return folder, len(snap.pool)


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
    with open(folder / "manifest.csv", newline="") as f:  # blind: no score or prediction
        assert list(next(csv.DictReader(f))) == ["file", "image_id", "source_path", "rank"]
    with open(kept_manifest(tiny_config.workspace, 1), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "file",
        "image_id",
        "source_path",
        "rank",
        "score",
        "predicted",
        "p_normal",
        "p_pneumonia",
    ]
    for r in rows:
        assert file_sha256(folder / r["file"]) == r["image_id"]
        assert file_sha256(Path(r["source_path"])) == r["image_id"]
        assert r["predicted"] == "pneumonia"
    dicoms = [n for n in names if n.endswith(".dcm")]
    after = {p: p.read_bytes() for p in (tiny_data["root"] / "pool").rglob("*") if p.is_file()}
    assert before == after  # sources untouched
    with Workspace(tiny_config) as ws:  # exported images leave the pool until ingested
        assert len(sync(ws).pool) == pool_size - 4
    assert all((folder / d).stat().st_size > 128 for d in dicoms)


def test_neutralise():
    assert neutralise("=cmd()") == "'=cmd()"
    assert neutralise("-0.25") == "-0.25"
    assert neutralise("a.png") == "a.png"


# --- hostile folders and files (issue 13) --------------------------------------------------


def test_manifest_predicted_class_is_neutralised(tmp_path, tiny_data):
    for split in ("labelled", "validation"):
        (tiny_data["root"] / split / "pneumonia").rename(tiny_data["root"] / split / "=1+1")
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('"pneumonia"', '"=1+1"'))
    cfg = load_config(path)
    shown = load_config(path, {"labelling.show_predictions": True})
    folder, _ = export(shown)  # probabilities [0.3, 0.7]: predicted "=1+1"
    for manifest in (folder / "manifest.csv", kept_manifest(cfg.workspace, 1)):
        with open(manifest, newline="") as f:
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


# --- blind labelling (issue 26) --------------------------------------------------------------
# what a reader could learn of the model from an export with probabilities [0.1234, 0.8766]
# and scores 0.61803..., 0.30901...: the values in any format the folder uses, and the words
_PROBS = ("0.1234", "0.8766", "0.123", "0.877", "12.3%", "87.7%")
_SCORES = ("0.618034", "0.618", "0.309017", "0.309")
_WORDS = ("model predicts", "predicted", "p_normal", "p_pneumonia")


def _readable(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (previews and image copies included), as text."""
    return {
        str(p.relative_to(folder)): p.read_bytes().decode("latin-1")
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_a_blind_round_folder_shows_no_prediction_or_score(tmp_path, tiny_data):
    cfg = load_config(write_config(tmp_path))
    assert cfg.labelling.show_predictions is False  # blind is the default
    folder, _ = export(cfg, probs=(0.1234, 0.8766), score=lambda i: 0.6180339 / (i + 1))
    texts = _readable(folder)
    assert {"README.txt", "index.html", "manifest.csv", "labels.csv"} <= set(texts)
    assert any(n.startswith("previews/") for n in texts)
    for name, text in texts.items():
        for shown in (*_PROBS, *_SCORES):
            assert shown not in text, f"{shown} in {name}"
        if not name.startswith("previews/") and Path(name).suffix not in (".dcm", ".png"):
            for word in _WORDS:
                assert word not in text.lower(), f"{word!r} in {name}"
    readme = texts["README.txt"]
    assert "Blind labelling" in readme and "labelling.show_predictions = false" in readme
    assert f'medal labels serve "{folder}"' in readme
    # the workspace keeps them: the full manifest and the ledger
    kept = kept_manifest(cfg.workspace, 1).read_text()
    assert "0.8766" in kept and "0.618034" in kept and "pneumonia" in kept
    with Workspace(cfg) as ws:
        assert {s.predicted for s in ws.db.selections(1)} == {"pneumonia"}


def test_with_show_predictions_the_round_folder_shows_them(tmp_path, tiny_data):
    cfg = load_config(write_config(tmp_path), {"labelling.show_predictions": True})
    folder, _ = export(cfg, probs=(0.1234, 0.8766), score=lambda i: 0.6180339 / (i + 1))
    texts = _readable(folder)
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "file",
        "image_id",
        "source_path",
        "rank",
        "score",
        "predicted",
        "p_normal",
        "p_pneumonia",
    ]
    assert rows[0]["score"] == "0.618034" and rows[0]["p_pneumonia"] == "0.8766"
    assert {r["predicted"] for r in rows} == {"pneumonia"}
    html = texts["index.html"]
    assert "model predicts" in html and "0.877" in html and "87.7%" in html and "0.618" in html
    assert "Blind" not in texts["README.txt"] and "prediction" in texts["README.txt"]
    assert f'medal labels serve -c "{cfg.path}" "{folder}"' in texts["README.txt"]


def test_a_blind_de_identified_round_keeps_only_file_and_rank(tmp_path, tiny_data):
    cfg = load_config(write_config(tmp_path), {"labelling.deidentify": True})
    folder, _ = export(cfg)
    with open(folder / "manifest.csv", newline="") as f:
        assert list(next(csv.DictReader(f))) == ["file", "rank"]
    with open(kept_manifest(cfg.workspace, 1), newline="") as f:
        assert "source_path" in next(csv.DictReader(f))
