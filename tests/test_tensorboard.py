"""train.tensorboard: one TensorBoard run per project, read back by TensorBoard itself."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config

from medal import api
from medal.cli import main
from medal.config import load_config

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed (pip install 'medal-al[tensorboard]')",
)

ROOT = Path(__file__).resolve().parents[1]


def read_run(folder):
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return acc, set(acc.Tags()["scalars"])


def steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def event_files(folder: Path) -> list[str]:
    """The run's event files by part (``round-000``, ``pretraining``); asserts one run: no
    subfolders (each would be a run of its own)."""
    assert not [p for p in folder.iterdir() if p.is_dir()]
    return sorted(p.name.rsplit(".", 1)[1] for p in folder.iterdir())


def test_a_full_training_logs_named_curves_and_its_metrics_against_labels(tmp_path, tiny_data):
    cfg = load_config(
        write_config(tmp_path),
        {
            "train.tensorboard": True,
            "train.epochs": 3,
            "train.min_steps": 1,
            "train.validate_every": 2,
        },
    )
    r = api.train(cfg, progress=False)
    run = cfg.workspace / "tensorboard"
    assert event_files(run) == ["round-000"]
    acc, tags = read_run(run)

    assert r.epochs == 3
    assert steps(acc, "round-000/train/loss") == [1, 2, 3]
    assert all(e.value > 0 for e in acc.Scalars("round-000/train/loss"))
    # validation metrics at the evaluated epochs only (every 2nd, and the last), per-class ones
    # named by class as the round's reported metrics are (not by class index)
    for metric in ("loss", "accuracy", "sensitivity/normal", "specificity/pneumonia"):
        assert steps(acc, f"round-000/validation/{metric}") == [2, 3]
    assert not [t for t in tags if t.rsplit("/", 1)[-1].isdigit()], tags
    # the round's reported metrics, at step = the number of labels it trained on
    for metric in ("accuracy", "balanced_accuracy", "loss", "sensitivity/pneumonia"):
        (e,) = acc.Scalars(f"labels/validation/{metric}")
        assert e.step == r.n_labels
        assert e.value == pytest.approx(r.metrics["validation"][metric], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("labels/best_epoch")] == [
        (r.n_labels, r.best_epoch)
    ]
    assert [(e.step, e.value) for e in acc.Scalars("labels/model_round")] == [(r.n_labels, 0)]
    assert not any("confusion" in t for t in tags)
    assert not any(t.startswith("labels/test/") for t in tags)  # no test set configured


def test_the_training_loss_is_written_while_it_trains(tmp_path, tiny_data):
    """A real `medal train` that would run for hours: its loss curve is readable meanwhile."""
    cfg_path = write_config(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medal",
            "train",
            "-c",
            str(cfg_path),
            "-q",
            "--set",
            "train.tensorboard=true",
            "--set",
            "train.epochs=1000000",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run = tmp_path / "ws" / "tensorboard"
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(seen) < 3:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
            if run.is_dir():
                acc, tags = read_run(run)
                if "round-000/train/loss" in tags:
                    seen = steps(acc, "round-000/train/loss")
        assert proc.poll() is None  # still training
    finally:
        proc.kill()
        proc.communicate()
    assert seen[:3] == [1, 2, 3]


def fill(folder: Path, truth: dict[str, str]) -> None:
    with open(folder.parent / "manifests" / f"{folder.name}.csv", newline="") as f:
        rows = [(r["file"], truth[r["source_path"]]) for r in csv.DictReader(f)]
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *rows])


def test_one_run_per_project_pretraining_probe_and_rounds_as_curves(tmp_path, tiny_data):
    cfg_path = write_config(tmp_path)
    c = [
        "-c",
        str(cfg_path),
        "-q",
        "--set",
        "train.tensorboard=true",
        "--set",
        "representation.method=simclr",
        "--set",
        "representation.epochs=2",
        "--set",
        "representation.batch_size=16",
        "--set",
        "train.freeze_backbone=true",
        "--set",
        "train.probe_steps=20",
        "--set",
        "query.strategy=random",
    ]
    assert main(["train", *c]) == 0
    run = tmp_path / "ws" / "tensorboard"
    assert event_files(run) == ["pretraining", "round-000"]
    acc, _ = read_run(run)
    # one point per optimiser step of the pretraining (full batches of 16, 2 epochs)
    pre = steps(acc, "pretraining/loss")
    assert pre == list(range(1, len(pre) + 1)) and len(pre) >= 4
    assert steps(acc, "round-000/train/loss") == list(range(1, 21))  # each step of the head
    assert steps(acc, "round-000/validation/accuracy") == [20]

    cfg = load_config(
        cfg_path,
        {
            "train.tensorboard": True,
            "representation.method": "simclr",
            "representation.epochs": 2,
            "representation.batch_size": 16,
            "train.freeze_backbone": True,
            "train.probe_steps": 20,
            "query.strategy": "random",
        },
    )
    q = api.query(cfg, progress=False)
    fill(q.folder, tiny_data["truth"])
    api.ingest(cfg, q.folder)
    first = api.train(cfg, progress=False)
    again = api.train(cfg, progress=False)  # model round 1 trained again: replaces its curve
    assert first.model_round == again.model_round == 1
    assert event_files(run) == ["pretraining", "round-000", "round-001"]
    acc, _ = read_run(run)
    n0 = steps(acc, "labels/model_round")[0]
    assert steps(acc, "labels/validation/accuracy") == [n0, again.n_labels]
    assert again.n_labels == n0 + 6  # the round's six labels
    assert [e.value for e in acc.Scalars("labels/model_round")] == [0, 1]
    assert steps(acc, "round-001/train/loss") == list(range(1, 21))  # once, not twice
    assert steps(acc, "pretraining/loss") == pre  # the cached backbone: not pretrained again


def test_missing_tensorboard_is_one_line_before_training(tmp_path, tiny_data, monkeypatch, capsys):
    # what `import` meets when the package is not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg_path = write_config(tmp_path)
    assert main(["train", "-c", str(cfg_path), "-q", "--set", "train.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "medal train: error: train.tensorboard = true needs the tensorboard package, "
        "which is not installed: pip install 'medal-al[tensorboard]' (or set "
        "train.tensorboard = false)"
    )
    assert not (tmp_path / "ws" / "checkpoints").exists() or not list(
        (tmp_path / "ws" / "checkpoints").glob("*.pt")
    )
