"""The whole loop through the CLI, in-process, on tiny PNG + DICOM data."""

from __future__ import annotations

import csv

import pytest
import torch

from medal import api
from medal.cli import main
from medal.config import load_config

from conftest import write_config
from medal.sources import sync


def fill(folder, truth, leave_empty=0):
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for i, r in enumerate(rows):
            w.writerow([r["file"], "" if i < leave_empty else truth[r["source_path"]]])
    return rows


def test_full_loop_via_cli(tmp_path, tiny_data, capsys):
    cfg_path = write_config(tmp_path)
    c = ["-c", str(cfg_path), "-q"]
    assert main(["train", *c]) == 0
    out = capsys.readouterr().out
    assert "model round 0: trained from scratch on 8 labels (normal 4, pneumonia 4)" in out
    assert "validation" in out and "AUROC" in out

    assert main(["query", *c]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "ws" / "labelling" / "round-001"
    assert "round 001: 6 images chosen by bald from a pool of 40" in out
    fill(folder, tiny_data["truth"], leave_empty=1)

    # querying again before ingesting is refused with the next step named
    assert main(["query", *c]) == 2
    assert "has not been ingested yet" in capsys.readouterr().err

    assert main(["ingest", *c, str(folder)]) == 0
    assert "recorded 5 labels" in capsys.readouterr().out
    assert main(["ingest", *c, str(folder)]) == 0
    assert "nothing changed" in capsys.readouterr().out

    assert main(["round", *c]) == 0
    out = capsys.readouterr().out
    assert "model round 1: fine-tuned from round 0 on 13 labels" in out
    assert "round 002: 6 images chosen by bald from a pool of 35" in out

    assert main(["status", *c]) == 0
    out = capsys.readouterr().out
    assert "labels: 13" in out and "awaiting labels" in out and "ingested" in out

    cfg = load_config(cfg_path)
    s = api.status(cfg)
    assert [m["round"] for m in s.models] == [0, 1]
    assert s.models[1]["parent"] == 0
    assert set(s.metrics[1]["validation"]) >= {"accuracy", "balanced_accuracy", "auroc"}


def test_dicom_pool_is_scored_and_exported(tmp_path, tiny_data, capsys):
    cfg_path = write_config(tmp_path)
    c = ["-c", str(cfg_path), "-q", "--set", "query.budget=40", "--set", 'query.strategy="random"']
    assert main(["train", *c]) == 0
    assert main(["query", *c]) == 0
    folder = tmp_path / "ws" / "labelling" / "round-001"
    exported = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert sum(n.endswith(".dcm") for n in exported) == 10  # every DICOM stays DICOM
    assert sum(n.endswith(".png") for n in exported) == 30


def test_bad_config_and_missing_workspace_are_clear(tmp_path, tiny_data, capsys):
    cfg_path = write_config(tmp_path)
    assert main(["status", "-c", str(cfg_path)]) == 2
    assert "no workspace" in capsys.readouterr().err
    assert main(["train", "-c", str(cfg_path), "--set", "query.budget=0"]) == 2
    assert "'query.budget' must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cmd", ["train", "query", "ingest", "round", "status", "labels", "simulate"]
)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_warm_start_and_retrain(tmp_path, tiny_data):
    import torch

    from medal.api import initial_model
    from medal.workspace import Workspace

    cfg_path = write_config(tmp_path)
    cfg = load_config(cfg_path)
    api.train(cfg, progress=False)
    with Workspace(cfg) as ws:
        warm, parent = initial_model(ws, cfg, 1)
        assert parent == 0
        ck = torch.load(ws.checkpoint_path(0), weights_only=True)["state_dict"]
        for k, v in warm.state_dict().items():
            assert torch.equal(v, ck[k])
        cold_cfg = load_config(cfg_path, {"train.round_start": "retrain"})
        cold, parent = initial_model(ws, cold_cfg, 1)
        again, _ = initial_model(ws, cold_cfg, 2)
        assert parent is None
        assert not torch.equal(cold.head[1].weight, warm.head[1].weight)
        assert torch.equal(cold.head[1].weight, again.head[1].weight)  # same fresh start


def test_frozen_validation_split_without_validation_set(tmp_path, tiny_data):
    from medal.workspace import Workspace

    cfg_path = write_config(tmp_path)
    text = cfg_path.read_text().replace('validation = "data/validation"\n', "")
    cfg_path.write_text(text)
    cfg = load_config(cfg_path, {"train.validation_fraction": 0.25})
    with Workspace(cfg) as ws:
        snap = sync(ws)
        first = sorted(it.id for it in snap.validation)
        assert len(first) == 2  # 25% of 4 per class, stratified
        assert {it.label for it in snap.validation} == {"normal", "pneumonia"}
        assert not set(first) & {it.id for it in snap.labelled}
    r = api.train(cfg, progress=False)
    assert r.n_labels == 6 and r.metrics["validation"]["n"] == 2
    with Workspace(load_config(cfg_path, {"train.validation_fraction": 0.5})) as ws:
        assert sorted(it.id for it in sync(ws).validation) == first  # frozen in the ledger


@pytest.mark.parametrize(
    "strategy", ["batchbald", "coreset", "badge", "powerbald", "entropy", "typiclust", "epig"]
)
def test_query_with_each_strategy_kind(tmp_path, tiny_data, strategy):
    """The configured strategy is the one that chose: the export equals what the acquisition
    function picks from the stored scores (same seed), and the ledger names it."""
    import numpy as np

    from medal import acquisition
    from medal.workspace import Workspace

    cfg = load_config(
        write_config(tmp_path), {"query.strategy": strategy, "query.balance": strategy == "entropy"}
    )
    api.train(cfg, progress=False)
    r = api.query(cfg, progress=False)
    assert r.n_selected == 6 and r.folder.is_dir() and r.strategy == strategy
    scores = cfg.workspace / "scores" / "round-001"
    probs = np.load(scores / "probs.npy").astype(np.float32)
    feats = np.load(scores / "features.npy").astype(np.float32)
    ids = np.load(scores / "ids.npy")
    with Workspace(cfg, lock=False) as ws:
        assert ws.db.rounds()[0].strategy == strategy
        exported = [s.image_id for s in ws.db.selections(1)]
        labelled = None
        if acquisition.get_strategy(strategy).needs_labelled_features:
            from medal.api import load_items, load_round_model
            from medal.uncertainty import mc_predict_tensors

            model, _ = load_round_model(ws, cfg)
            xl, _, _, _ = load_items(cfg, sync(ws).labelled)
            _, labelled = mc_predict_tensors(
                model, xl, 2, device=torch.device("cpu"), seed=cfg.seed * 1000 + 1
            )
    rng = np.random.default_rng(cfg.seed * 1000 + 1)  # the query's seed for round 1
    idx, _ = acquisition.select(
        strategy,
        probs,
        6,
        rng=rng,
        features=feats,
        labelled_features=labelled,
        balance=strategy == "entropy",
    )
    assert exported == [str(i) for i in ids[idx]]


@pytest.mark.parametrize("cold_start", ["typiclust", "diversity"])
def test_single_class_start_explores_the_feature_space(tmp_path, tiny_data, cold_start):
    import shutil as sh

    sh.rmtree(tiny_data["root"] / "labelled" / "pneumonia")  # start set lacks a class
    overrides = {"query.budget": 10}
    if cold_start != "typiclust":  # typiclust is the default
        overrides["query.cold_start"] = cold_start
    cfg = load_config(write_config(tmp_path), overrides)
    api.train(cfg, progress=False)
    r = api.query(cfg, progress=False)
    assert r.strategy == f"bald:cold-start-{cold_start}"
    assert any(n.startswith("no label yet for pneumonia: chosen by") for n in r.notes)
    with open(r.folder / "manifest.csv", newline="") as f:
        sources = [row["source_path"] for row in csv.DictReader(f)]
    labels = {tiny_data["truth"][s] for s in sources}
    assert labels == {"normal", "pneumonia"}  # the missing class is found in one round
    off = load_config(write_config(tmp_path), {"query.cold_start": "off"})
    (r.folder / "labels.csv").write_text("file,label\n")
    api.ingest(off, r.folder)
    plain = api.query(off, progress=False)
    assert plain.strategy == "bald" and not any("no label yet" in n for n in plain.notes)


def test_unchanged_model_reuses_scores(tmp_path, tiny_data):
    cfg = load_config(write_config(tmp_path))
    api.train(cfg, progress=False)
    first = api.query(cfg, progress=False)
    assert first.reused == 0
    (first.folder / "labels.csv").write_text("file,label\n")  # handed back unlabelled
    api.ingest(cfg, first.folder)
    second = api.query(cfg, progress=False)  # same model, same pool: nothing re-scored
    assert second.reused == 40 and second.pool_size == 40

    def chosen(folder):  # the workspace's manifest has the scores (the round folder is blind)
        with open(folder.parent / "manifests" / f"{folder.name}.csv", newline="") as f:
            return {r["image_id"]: float(r["score"]) for r in csv.DictReader(f)}

    a, b = chosen(first.folder), chosen(second.folder)
    for image_id in set(a) & set(b):
        assert abs(a[image_id] - b[image_id]) < 5e-3  # stored as float16
    assert len(set(a) & set(b)) >= 4
    fill(second.folder, tiny_data["truth"])
    api.ingest(cfg, second.folder)
    api.train(cfg, progress=False)
    assert api.query(cfg, progress=False).reused == 0  # a new model scores everything again


def test_every_frame_of_a_multiframe_dicom_is_its_own_image(tmp_path, tiny_data):
    import numpy as np
    import pydicom

    from medal.dicomwrite import write_dicom
    from medal.workspace import Workspace

    path = tiny_data["root"] / "pool" / "dicom" / "cine.dcm"
    write_dicom(path, np.zeros((16, 16), np.uint16), bits_stored=12)
    ds = pydicom.dcmread(path)
    frames = np.stack([np.full((16, 16), v, np.uint16) for v in (100, 2000, 4000)])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.save_as(path, enforce_file_format=True)
    cfg = load_config(
        write_config(tmp_path),
        {"image.frame": "all", "query.budget": 60, "query.strategy": "random"},
    )
    with Workspace(cfg) as ws:
        ids = [it.id for it in sync(ws).pool if it.path == path]
    assert [i.rsplit("#", 1)[1] for i in ids] == ["f0", "f1", "f2"]
    api.train(cfg, progress=False)
    r = api.query(cfg, progress=False)
    assert r.pool_size == 43  # 40 single-frame images + 3 frames of the cine file
    names = sorted(p.name for p in r.folder.glob("*_f[0-9].dcm"))
    assert len(names) == 3
    previews = {n: np.asarray(pydicom.dcmread(r.folder / n).pixel_array).shape for n in names}
    assert all(shape == (3, 16, 16) for shape in previews.values())  # whole file exported
    from PIL import Image

    means = sorted(
        np.asarray(Image.open(r.folder / "previews" / f"{n[:-4]}.png")).mean() for n in names
    )
    assert means[0] < means[1] < means[2]  # each preview shows its own frame
    with open(r.folder / "labels.csv", "w") as f:
        f.write(
            "file,label\n"
            + "".join(f"{n},{lab}\n" for n, lab in zip(names, ["normal", "pneumonia", "normal"]))
        )
    assert api.ingest(cfg, r.folder).labelled == {"normal": 2, "pneumonia": 1}
    t = api.train(cfg, progress=False)
    assert t.n_labels == 8 + 3


def test_pool_copies_of_evaluation_images_are_left_out_and_said_once(tmp_path, tiny_data, capsys):
    import shutil

    root = tiny_data["root"]
    shutil.copy(root / "validation" / "normal" / "v0.png", root / "pool" / "png" / "copy.png")
    cfg_path = write_config(tmp_path)
    c = ["-c", str(cfg_path), "-q"]
    assert main(["train", *c]) == 0
    out = capsys.readouterr().out
    assert "1 pool image(s) are byte-identical to validation or test images" in out
    listed = (tmp_path / "ws" / "pool-overlap.csv").read_text().splitlines()
    assert listed[0] == "file,also_in" and listed[1].endswith("copy.png,validation")
    assert main(["query", *c]) == 0
    out = capsys.readouterr().out
    assert "byte-identical" not in out  # said once
    assert "from a pool of 40" in out  # 41 files, the copy left out


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["simulate", "--help"], None])
def test_version_and_help_start_without_torch(argv):
    """``medal --version`` / ``--help`` and building the parser import no torch (seconds of
    start-up on a loaded machine); a fresh interpreter shows what the command alone imports."""
    import subprocess
    import sys
    from pathlib import Path

    call = (
        "medal.cli.build_parser()"
        if argv is None
        else f"""
try:
    medal.cli.main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code"""
    )
    code = f"import sys\nimport medal.cli\n{call}\nprint('torch' in sys.modules, file=sys.stderr)"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "False", "torch was imported"
    if argv == ["--version"]:
        assert r.stdout.startswith("medal ")


@pytest.mark.parametrize("layout", ["empty folder", "a clone's folder"])
def test_a_medal_folder_in_the_current_folder_is_named(tmp_path, layout):
    """From a folder holding a ``medal/`` folder that is not the package (an empty one, or a
    clone's top folder), ``python -m medal`` and ``import medal.cli`` say what happened instead
    of "cannot import name ... (unknown location)"; the ``medal`` command still works."""
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "medal"
    folder.mkdir()
    if layout == "a clone's folder":
        (folder / "pyproject.toml").write_text("[project]\nname = 'medal-al'\n")
        (folder / "data").mkdir()  # shadows medal.data too
        (folder / "README.md").write_text("medal\n")

    def python(*args):
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    if python("-c", "import medal; print(medal.__file__)").stdout.strip() != "None":
        pytest.skip(
            "this install is not shadowed by a folder named medal (a regular install "
            "wins over a namespace folder; setuptools' editable finder does not)"
        )
    said = (
        f"'import medal' found the folder {folder}, which is not the medal package (it "
        f"has no __init__.py), because Python looks in the current folder first: run "
        f"python from another folder, or use the 'medal' command (medal itself is in "
        f"{Path(__file__).resolve().parents[1] / 'medal'})"
    )
    r = python("-m", "medal", "--version")
    assert (r.returncode, r.stderr.strip()) == (2, f"medal: error: {said}")
    r = python("-c", "import medal.cli")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == f"ImportError: {said}"
    script = Path(sys.executable).with_name("medal")
    if script.is_file():
        r = subprocess.run(
            [str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0 and r.stdout.startswith("medal ")
