"""The radiologists' side: previews and gallery (in a real headless Chromium),
de-identification, several annotators, unsure images, label export, links."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medal import api
from medal.cli import main
from medal.config import load_config
from medal.dicomwrite import write_dicom
from medal.errors import LabellingError

from conftest import write_config
from medal.sources import sync


def run_chromium(chromium: str, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=5000",
    ]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def export_all(tmp_path, **overrides) -> tuple:
    cfg = load_config(write_config(tmp_path), {"query.strategy": "random", **overrides})
    api.train(cfg, progress=False)
    return cfg, api.query(cfg, progress=False).folder


def files(folder):
    with open(folder / "labels.csv", newline="") as f:
        return [r["file"] for r in csv.DictReader(f)]


@pytest.mark.browser
def test_gallery_renders_in_headless_chromium(chromium, tmp_path, tiny_data):
    cfg, folder = export_all(tmp_path, **{"labelling.show_predictions": True})
    names = files(folder)
    previews = sorted((folder / "previews").iterdir())
    assert len(previews) == len(names) == 6
    for p in previews:
        with Image.open(p) as im:
            assert im.size == (16, 16) and im.mode == "L"
    page = (folder / "index.html").as_uri()
    # --dump-dom can snapshot the page before a busy machine has decoded every preview (seen
    # once on two loaded cores: a flaky failure); dump again, up to three times, and require
    # that one snapshot shows every preview decoded
    for attempt in range(3):
        dom = run_chromium(
            chromium, f"--user-data-dir={tmp_path / f'chrome1-{attempt}'}", "--dump-dom", page
        )
        assert dom.returncode == 0, dom.stderr
        html = dom.stdout
        if 'data-images="6" data-loaded="6"' in html:
            break
    assert html.count('class="card"') == 6
    assert 'data-images="6" data-loaded="6"' in html  # every preview decoded by the browser
    for name in names:
        assert f'data-file="{name}"' in html
    for label in ("normal", "pneumonia", "unsure"):
        assert f"<code>{label}</code>" in html
    assert 'data-rank="1"' in html and "model predicts" in html
    shot = tmp_path / "shot.png"
    r = run_chromium(
        chromium,
        f"--user-data-dir={tmp_path / 'chrome2'}",
        f"--screenshot={shot}",
        "--window-size=1200,900",
        page,
    )
    assert r.returncode == 0 and shot.is_file()
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("L"))
    assert arr.shape == (900, 1200) and arr.std() > 5  # a real rendered page, not blank


def test_deidentified_export_leaks_nothing(tmp_path, tiny_data):
    secrets = [
        "DOE^JANE",
        "MRN-4711",
        "19700101",
        "St Example Hospital",
        "ACC-99881",
        "DR^WHO",
        "SECRET-PRIVATE",
        "Radiology Basement 3",
    ]
    study = pydicom.uid.generate_uid()
    originals = []
    for i in range(2):
        p = tiny_data["root"] / "pool" / "dicom" / f"id{i}.dcm"
        write_dicom(p, np.full((16, 16), 100 + i * 900, np.uint16), bits_stored=12)
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "MRN-4711", "19700101"
        ds.InstitutionName, ds.AccessionNumber = "St Example Hospital", "ACC-99881"
        ds.ReferringPhysicianName, ds.InstitutionAddress = "DR^WHO", "Radiology Basement 3"
        ds.StudyInstanceUID = study
        block = ds.private_block(0x0011, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "SECRET-PRIVATE")
        ds.save_as(p, enforce_file_format=True)
        originals.append(pydicom.dcmread(p))
    cfg, folder = export_all(tmp_path, **{"query.budget": 100, "labelling.deidentify": True})
    exported = [
        folder / n
        for n in files(folder)
        if n.endswith(".dcm") and pydicom.dcmread(folder / n).Rows == 16
    ]
    by_uid = {}
    for p in exported:
        data = p.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"{s} survived in {p.name}"
        ds = pydicom.dcmread(p)
        assert ds.PatientIdentityRemoved == "YES"
        by_uid[ds.SOPInstanceUID] = ds
    assert len(by_uid) == 12  # 10 pool DICOMs from the fixture + 2 with identifiers
    ours = [d for d in by_uid.values() if int(d.pixel_array[0, 0]) in (100, 1000)]
    assert len(ours) == 2
    assert ours[0].StudyInstanceUID == ours[1].StudyInstanceUID != study  # consistent new UID
    assert {o.SOPInstanceUID for o in originals}.isdisjoint(by_uid)
    assert sorted(int(d.pixel_array[0, 0]) for d in ours) == [100, 1000]  # pixels kept
    # the mapping back to the sources stays in the workspace
    with open(folder / "manifest.csv", newline="") as f:
        assert "source_path" not in next(csv.reader(f))
    private = cfg.workspace / "labelling" / "manifests" / "round-001.csv"
    assert "id0.dcm" in private.read_text()
    # ingest still verifies the (de-identified) copies
    names = files(folder)
    with open(folder / "labels.csv", "w", newline="") as f:
        f.write("file,label\n" + "".join(f"{n},normal\n" for n in names))
    assert api.ingest(cfg, folder).labelled == {"normal": len(names)}


def test_several_annotators_agreement_and_adjudication(tmp_path, tiny_data, capsys):
    cfg, folder = export_all(tmp_path)
    n = files(folder)
    (folder / "labels_alice.csv").write_text(
        f"file,label\n{n[0]},normal\n{n[1]},pneumonia\n{n[2]},normal\n{n[3]},normal\n"
    )
    (folder / "labels_bob.csv").write_text(
        f"file,label\n{n[0]},normal\n{n[1]},pneumonia\n{n[2]},pneumonia\n{n[3]},normal\n"
    )
    with pytest.raises(LabellingError, match="annotators disagree.*alice: normal, bob: pneumonia"):
        api.ingest(cfg, folder)
    (folder / "labels.csv").write_text(f"file,label\n{n[2]},pneumonia\n")  # adjudication
    c = ["-c", str(cfg.path)]
    assert main(["ingest", *c, str(folder)]) == 0
    out = capsys.readouterr().out
    assert "recorded 4 labels (normal 2, pneumonia 2)" in out
    assert "agreement alice vs bob: Cohen's kappa 0.500 on 4 image(s)" in out
    assert "1 disagreement(s) settled" in out
    assert main(["labels", *c, "export", "-o", str(tmp_path / "all.csv")]) == 0
    with open(tmp_path / "all.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    mine = [r for r in rows if r["round"] == "1"]
    assert len(mine) == 8 + 4  # every annotator's label kept, plus the final labels
    assert {r["annotator"] for r in mine} >= {"alice", "bob"}
    assert {r["source"] for r in mine} == {
        "labels_alice.csv",
        "labels_bob.csv",
        "consensus",
        "adjudicated",
    }  # labels.csv's one label settled n[2]


def test_unsure_leaves_the_pool_until_released(tmp_path, tiny_data, capsys):
    cfg, folder = export_all(tmp_path)
    n = files(folder)
    (folder / "labels.csv").write_text(f"file,label\n{n[0]},unsure\n{n[1]},normal\n")
    api.ingest(cfg, folder)
    c = ["-c", str(cfg.path)]
    assert main(["labels", *c, "unsure"]) == 0
    assert "1 image(s) labelled unsure" in capsys.readouterr().out
    pool_before = api.train(cfg, progress=False)
    assert pool_before.n_labels == 9  # unsure is not a training label
    from medal.workspace import Workspace

    with Workspace(cfg) as ws:
        size = len(sync(ws).pool)
    assert main(["labels", *c, "release"]) == 0
    with Workspace(cfg) as ws:
        assert len(sync(ws).pool) == size + 1


def test_links_pointing_outside_are_refused(tmp_path, tiny_data):
    cfg, folder = export_all(tmp_path)
    n = files(folder)
    outside = tmp_path / "elsewhere.png"
    shutil.copy(folder / n[0], outside)
    (folder / n[0]).unlink()
    os.symlink(outside, folder / "normal" / n[0])
    with pytest.raises(LabellingError, match="link to a file outside the round folder"):
        api.ingest(cfg, folder)


def test_second_command_on_a_locked_workspace_fails_clearly(tmp_path, tiny_data, capsys):
    import sys

    cfg, folder = export_all(tmp_path)
    (folder / "labels.csv").write_text("file,label\n")  # hand the round back unlabelled
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from medal.config import load_config\nfrom medal.workspace import Workspace\n"
            "with Workspace(load_config(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(60)\n",
            str(cfg.path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["ingest", "-c", str(cfg.path), str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another medal command (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(["ingest", "-c", str(cfg.path), str(folder)]) == 0
