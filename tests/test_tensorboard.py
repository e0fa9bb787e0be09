"""train.tensorboard: each round's training as a TensorBoard run, read back by TensorBoard."""

from __future__ import annotations

import sys

import pytest

from medal import api
from medal.cli import main
from medal.config import load_config
from medal.workspace import Workspace

from conftest import write_config

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed (pip install 'medal-al[tensorboard]')")


def read_run(folder):
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return acc, set(acc.Tags()["scalars"])


def steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def test_a_round_writes_its_curves_and_metrics(tmp_path, tiny_data):
    cfg = load_config(write_config(tmp_path), {
        "train.tensorboard": True, "train.epochs": 3, "train.min_steps": 1,
        "train.validate_every": 2})
    r = api.train(cfg, progress=False)
    run = Workspace(cfg).tensorboard_dir(0)
    assert run == cfg.workspace / "tensorboard" / "round-000"
    acc, tags = read_run(run)

    assert r.epochs == 3
    assert steps(acc, "train/loss") == [1, 2, 3]
    assert all(e.value > 0 for e in acc.Scalars("train/loss"))
    # validation metrics at the evaluated epochs only (every 2nd, and the last)
    for metric in ("loss", "accuracy", "balanced_accuracy"):
        assert steps(acc, f"validation/{metric}") == [2, 3]
    # the round's reported metrics, at step = model round, equal to what medal reports
    for metric in ("accuracy", "balanced_accuracy", "loss"):
        (e,) = acc.Scalars(f"final/validation/{metric}")
        assert e.step == 0
        assert e.value == pytest.approx(r.metrics["validation"][metric], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("final/best_epoch")] == [(0, r.best_epoch)]
    assert not any("confusion" in t for t in tags)
    assert not any(t.startswith("final/test/") for t in tags)  # no test set configured


def test_each_round_is_its_own_run_and_a_retrained_round_replaces_its_run(tmp_path):
    from medal.tensorboard_log import write_round

    root = tmp_path / "tensorboard"
    history = [{"epoch": 1.0, "loss": 0.9}, {"epoch": 2.0, "loss": 0.5, "val_auroc": 0.8,
                                             "val_confusion/a/b": 3.0,
                                             "val_accuracy": float("nan")}]
    write_round(root / "round-000", 0, history, {"test": {"auroc": 0.7}}, 2)
    write_round(root / "round-000", 0, history, {"test": {"auroc": 0.75}}, 2)  # again
    write_round(root / "round-001", 1, history[:1], {}, 1)  # a probe: one row
    assert sorted(p.name for p in root.iterdir()) == ["round-000", "round-001"]
    assert len(list((root / "round-000").iterdir())) == 1
    acc, tags = read_run(root / "round-000")
    assert tags == {"train/loss", "validation/auroc", "final/test/auroc", "final/best_epoch"}
    assert steps(acc, "train/loss") == [1, 2] and steps(acc, "validation/auroc") == [2]
    assert [e.value for e in acc.Scalars("final/test/auroc")] == [pytest.approx(0.75)]
    acc, tags = read_run(root / "round-001")
    assert steps(acc, "train/loss") == [1] and steps(acc, "final/best_epoch") == [1]


def test_missing_tensorboard_is_one_line_before_training(tmp_path, tiny_data, monkeypatch,
                                                         capsys):
    # what `import` meets when the package is not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg_path = write_config(tmp_path)
    assert main(["train", "-c", str(cfg_path), "-q", "--set", "train.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("medal train: error: train.tensorboard = true needs the tensorboard package, "
                   "which is not installed: pip install 'medal-al[tensorboard]' (or set "
                   "train.tensorboard = false)")
    assert not (tmp_path / "ws" / "checkpoints").exists() or \
        not list((tmp_path / "ws" / "checkpoints").glob("*.pt"))
