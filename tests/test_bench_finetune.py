"""scripts/bench_finetune.py: the random-pick curve's points, the whole arm's hold-out, the
summaries' paired differences, and one real (tiny) run of the frozen arm end to end."""

import csv

import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_finetune")


def test_the_ceiling_is_every_label_and_a_curve_adds_labels_to_the_last(bench):
    ((n, pick),) = bench.points(None, 50, 0)
    assert n == 50 and list(pick) == list(range(50))
    pts = bench.points("20:80:30", 100, 3)
    assert [n for n, _ in pts] == [20, 50, 80]
    for (n0, a), (_, b) in zip(pts, pts[1:]):
        assert list(b[:n0]) == list(a)  # each point's set contains the previous one
    assert len(set(pts[-1][1])) == 80
    other = bench.points("20:80:30", 100, 4)
    assert list(other[0][1]) != list(pts[0][1])  # the seed draws the order
    assert [n for n, _ in bench.points("20:320:30", 60, 0)] == [20, 50]  # capped at the pool


def test_the_whole_arm_holds_out_a_stratified_fifth(bench):
    y = np.array([0] * 80 + [1] * 20)
    tr, va = bench.whole_split(y, 0)
    assert len(va) == 20 and sorted([*tr, *va]) == list(range(100))
    assert np.bincount(y[va]).tolist() == [16, 4]
    assert list(bench.whole_split(y, 0)[1]) == list(va)


def test_the_summary_pairs_each_arm_with_frozen_and_whole_by_seed(bench, tmp_path):
    path = tmp_path / "results.csv"
    rows = [
        ("frozen", [0.70, 0.72, 0.71]),
        ("whole", [0.73, 0.71, 0.72]),
        ("mix", [0.74, 0.73, 0.75]),
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["seed", "arm", "test_auroc", "val_auroc"])
        w.writeheader()
        for arm, values in rows:
            for seed, v in enumerate(values):
                w.writerow({"seed": seed, "arm": arm, "test_auroc": v, "val_auroc": ""})
    text = bench.summary(path)
    assert "val AUROC" not in text  # no val column filled
    frozen_line = next(line for line in text.splitlines() if line.startswith("frozen"))
    assert frozen_line.split()[-1] == "0.7100"
    # mix - whole per seed: +0.01, +0.02, +0.03
    assert "test: mix - whole: +0.0200" in text
    assert "test: mix - frozen: +0.0300" in text


def test_a_tiny_frozen_run_writes_its_row_and_resumes(bench, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--pool", "48", "--seeds", "0", "--arms", "frozen", "--out", str(out),
        "--set", "representation.epochs=1", "--set", "train.probe_steps=20",
        "--set", 'train.head_choice="cv"', "--set", "train.head_choice_min_labels=40",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    with open(out / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["arm"] == "frozen" and row["pool"] == "48" and row["seed"] == "0"
    assert 0.0 <= float(row["test_auroc"]) <= 1.0 and 0.0 <= float(row["val_auroc"]) <= 1.0
    assert 'train.head_choice="cv"' in row["overrides"]
    assert (out / "backbone-seed0.pt").is_file()
    assert bench.main(argv) == 0  # done rows are skipped, not written twice
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_auto_parts_of_an_averaged_arm_resolve_as_medal_does(bench):
    """``model.name = "auto"`` on PneumoniaMNIST's 4,708 images: the frozen part of ``mix``
    uses the arm's small_cnn4 (its backbone file), the whole network small_cnn."""
    from medal.config import load_config
    from medal.inputs import for_count

    conf = bench.ROOT / "configs" / "pneumoniamnist.toml"
    auto = {"model.name": "auto"}
    arm = for_count(load_config(conf, {**bench.COMMON, **auto}), 4708)
    assert arm.model.name == "small_cnn4"
    frozen = load_config(conf, {**bench.COMMON, **auto})
    whole = load_config(conf, {**bench.COMMON, **bench.WHOLE, **auto})
    assert bench.resolved_as(frozen, arm).model.name == "small_cnn4"
    assert bench.resolved_as(whole, arm).model.name == "small_cnn"
    assert for_count(load_config(conf, {**bench.COMMON, **auto}), 1080).model.name == "small_cnn"


def test_an_arm_with_a_companion_predicts_the_pairs_average(bench):
    """The frozen arm with train.companion set: the model's forward is the head alone, so the
    bench averages in the companion as medal's predictions do."""
    import torch

    from medal.companion import build_companion

    torch.manual_seed(0)
    spec = {"name": "small_cnn", "num_classes": 2, "in_channels": 1, "dropout": 0.5, "hidden": 8}
    model = build_companion(spec)  # any model will do as the frozen arm's
    x = torch.randn(6, 1, 28, 28)
    alone = bench.model_probs(model, x)
    comp = build_companion(spec)
    with torch.no_grad():
        comp.head[-1].weight.zero_()
        comp.head[-1].bias.copy_(torch.tensor([30.0, -30.0]))  # certain of class 0
    model.companion = comp
    assert np.allclose(bench.model_probs(model, x), (alone + [[1.0, 0.0]]) / 2, atol=1e-6)
