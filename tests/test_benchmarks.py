"""medal.benchmarks: the label-efficiency table of scripts/bench_simulation.py, checked by hand,
and the full-label ceiling's training. (:func:`medal.benchmarks.measure` pretrains a backbone;
the benchmark scripts run it.)"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import dataclasses

import numpy as np
import torch

from medal.benchmarks import ceiling_auroc, ceiling_model, label_efficiency_table
from medal.config import load_config
from medal.train import predict_deterministic, predict_pair

from conftest import write_config
from test_train import separable

CPU = torch.device("cpu")

# (strategy, seed): test AUROC at 20 and 30 labels
CURVES = {
    ("random", 0): (0.6, 0.7),
    ("random", 1): (0.5, 0.7),
    ("bald", 0): (0.6, 0.8),
    ("bald", 1): (0.5, 0.9),
}


def results(path: Path, curves: dict[tuple[str, int], tuple[float, ...]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "round", "labels", "test/auroc"])
        for (strategy, seed), values in curves.items():
            for r, v in enumerate(values):
                w.writerow([strategy, seed, r, 20 + 10 * r, v])
    return path


def numbers(line: str, name: str) -> list[float]:
    assert line.startswith(name), (line, name)
    return [float(v) for v in line[34:].split()]


def test_label_efficiency_table_by_hand(tmp_path):
    table = label_efficiency_table(
        results(tmp_path / "results.csv", CURVES), ["random", "bald"], None
    ).splitlines()
    assert table[0].split() == ["seed", "0", "seed", "1", "mean"]
    assert numbers(table[1], "random: AUROC at 30 labels") == [0.7, 0.7, 0.7]
    # area = the curve's mean value over 20-30 labels: the mean of its two points
    assert numbers(table[2], "random: area 20-30 labels") == [0.65, 0.6, 0.625]
    assert numbers(table[3], "bald: AUROC at 30 labels") == [0.8, 0.9, 0.85]
    assert numbers(table[4], "bald: area 20-30 labels") == [0.7, 0.7, 0.7]
    assert numbers(table[5], "bald - random: area") == [0.05, 0.1, 0.075]
    # mean 0.075, sd 0.0354, t(0.975, 1) = 12.706: half width 12.706 * 0.025 = 0.3177
    assert table[6].split() == ["mean", "+0.0750,", "95%", "interval", "[-0.2427,", "+0.3927]"]
    assert len(table) == 7


def test_label_efficiency_table_against_a_baseline(tmp_path):
    base = results(tmp_path / "base.csv", {("random", 0): (0.7, 0.8), ("random", 1): (0.7, 0.8)})
    table = label_efficiency_table(
        results(tmp_path / "results.csv", CURVES), ["random", "bald"], f"{base}:random"
    ).splitlines()
    assert numbers(table[7], "baseline: AUROC at 30 labels") == [0.8, 0.8, 0.8]
    never = numbers(table[8], "random: labels to reach 0.800")
    assert all(math.isnan(v) for v in never)
    assert numbers(table[11], "bald: labels to reach 0.800") == [30, 30, 30]
    # bald - baseline areas: 0.70 - 0.75 on both seeds (no spread: a zero-width interval)
    assert numbers(table[12], "bald - baseline: area") == [-0.05, -0.05, -0.05]
    assert table[13].endswith("positive in 0 of 2")
    assert numbers(table[9], "random - baseline: area") == [-0.1, -0.15, -0.125]
    assert len(table) == 14


def test_the_ceiling_is_medals_training_with_its_companion_on_every_label(tmp_path):
    """With no pool the labels cover every image, so the companion joins (its label count
    lowered for 40 images) and the ceiling's probabilities are the pair's."""
    over = {
        "train.freeze_backbone": True,
        "model.hidden": 0,
        "train.validation_fraction": 0.0,
        "train.probe_steps": 50,
        "train.epochs": 2,
        "train.companion_min_labels": 20,
        "train.head_choice_min_labels": 20,
    }
    cfg = load_config(write_config(tmp_path), over)
    x, y = separable(40)
    model = ceiling_model(cfg, None, x, y)
    assert model.companion is not None
    xt, yt = separable(40, seed=1)
    pair = predict_deterministic(model, xt, CPU) + predict_deterministic(model.companion, xt, CPU)
    assert np.allclose(predict_pair(model, xt, CPU), pair / 2)
    assert ceiling_auroc(cfg, None, x, y, xt, yt) > 0.9
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, companion="off"))
    alone = ceiling_model(off, None, x, y)
    assert alone.companion is None
    assert np.array_equal(predict_pair(alone, xt, CPU), predict_deterministic(alone, xt, CPU))
