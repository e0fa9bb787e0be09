"""medal simulate: tiny simulations on generated PNG/DICOM data."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from medal import api
from medal import simulate as sim
from medal.config import load_config

from conftest import CLASSES, load_script, make_image, save, write_config


@pytest.fixture
def sim_setup(tmp_path: Path, tiny_data: dict) -> dict:
    """Config with a test split, and the fully labelled set: labelled/ plus a pool truth CSV."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(CLASSES):
        for i in range(6):
            save(tmp_path / "data" / "test" / name / f"t{i}.png", make_image(c, rng))
    cfg_path = write_config(tmp_path)
    cfg_path.write_text(
        cfg_path.read_text().replace(
            'validation = "data/validation"\n',
            'validation = "data/validation"\ntest = "data/test"\n',
        )
    )
    truth_csv = tmp_path / "pool_truth.csv"
    with open(truth_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows(sorted(tiny_data["truth"].items()))
    return {
        "config": cfg_path,
        "truth": (truth_csv, tmp_path / "data" / "labelled"),
        "out": tmp_path / "sim",
        "all_truth": tiny_data["truth"],
    }


def settings(setup: dict, **kw) -> sim.SimulationSettings:
    base = dict(
        truth=setup["truth"],
        out=setup["out"],
        strategies=("entropy", "random"),
        seeds=(0, 1),
        rounds=2,
        budget=4,
        start="class_balanced",
        start_size=4,
        verbose=False,
    )
    return sim.SimulationSettings(**(base | kw))


def exported_sources(out: Path, run: Path | None = None) -> list[str]:
    """Source paths of every image exported in the round folders of every run (or of one)."""
    found = []
    pattern = f"{run.relative_to(out).as_posix() if run else '*/seed-*'}/labelling/round-*/"
    for manifest in sorted(out.glob(pattern + "manifest.csv")):
        with open(manifest, newline="") as f:
            found += [r["source_path"] for r in csv.DictReader(f)]
    return found


def checkpoints(out: Path) -> dict[str, int]:
    """``{run/checkpoints/round-NNN.pt: mtime_ns}``: every model the simulation trained."""
    return {
        p.relative_to(out).as_posix(): p.stat().st_mtime_ns
        for p in out.glob("*/seed-*/checkpoints/round-*.pt")
        if re.fullmatch(r"round-\d+\.pt", p.name)
    }


def oracle_questions(out: Path) -> list[str]:
    """Every question the simulated radiologist was asked, from the runs' oracle.csv audits."""
    return [
        a["source_path"]
        for log in sorted(out.glob("*/seed-*/oracle.csv"))
        for a in csv.DictReader(open(log, newline=""))
    ]


def test_simulation_writes_results_plots_summary_and_resumes(sim_setup, capsys):
    cfg = load_config(sim_setup["config"])

    # no validation set is passed (the config's data.validation is not used): each run holds
    # out one start label per class for validation, and those labels still count
    r = sim.simulate(cfg, settings(sim_setup, start_size=6))
    out = sim_setup["out"].resolve()

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3 and len(checkpoints(out)) == 12
    assert {(x["strategy"], x["seed"], x["round"]) for x in rows} == {
        (s, str(k), str(n)) for s in ("entropy", "random") for k in (0, 1) for n in (0, 1, 2)
    }
    run = [x for x in rows if x["strategy"] == "entropy" and x["seed"] == "0"]
    assert [int(x["labels"]) for x in run] == [6, 10, 14]  # not 4, 8, 12: the 2 held out count
    assert [int(x["labels_train"]) for x in run] == [4, 8, 12]
    assert {x["labels_holdout"] for x in rows} == {"2"}
    assert all(float(x["validation/n"]) == 2 for x in rows)  # the hold-out, not data/validation
    cols = set(rows[0])
    assert {
        "train_seconds",
        "score_seconds",
        "test/auroc",
        "test/accuracy",
        "test/balanced_accuracy",
        "test/loss",
        "test/ece",
        "validation/auroc",
        "test/sensitivity/normal",
        "test/confusion/normal/pneumonia",
    } <= cols
    assert all(float(x["test/n"]) == 12 for x in rows)
    assert all(x["score_seconds"] == "" for x in rows if x["round"] == "0")
    assert all(float(x["score_seconds"]) >= 0 for x in rows if x["round"] != "0")
    # the whole round is timed, not only the fitting: query (scoring + export) <= round
    assert list(rows[0])[6:10] == [
        "train_seconds",
        "score_seconds",
        "query_seconds",
        "round_seconds",
    ]
    for x in rows:
        assert float(x["round_seconds"]) >= float(x["train_seconds"]) > 0
        if x["round"] == "0":
            assert x["query_seconds"] == ""
        else:
            assert (
                float(x["round_seconds"]) >= float(x["query_seconds"]) >= float(x["score_seconds"])
            )
            assert float(x["round_seconds"]) >= float(x["query_seconds"]) + float(
                x["train_seconds"]
            )
    for metric in sim.MAIN_METRICS:
        png = out / f"curve_test_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "Labels to reach random's final" in summary and "| entropy | 2 | 14 |" in summary
    assert "Paired difference to random" in summary and "| entropy | 2 |" in summary
    assert "holds out train.validation_fraction = 0.2" in summary
    assert "data.validation" in summary and "is not used" in summary
    assert r.summary == summary and not r.failures

    # the oracle was asked about exported images only (each once), never about the start sets
    exported = exported_sources(out)
    assert len(exported) == 2 * 2 * 2 * 4
    assert sorted(oracle_questions(out)) == sorted(exported)
    for run in out.glob("*/seed-*"):
        start = {row["file"] for row in csv.DictReader(open(run / "start.csv", newline=""))}
        asked = [a["source_path"] for a in csv.DictReader(open(run / "oracle.csv", newline=""))]
        assert sorted(asked) == sorted(exported_sources(run.parent.parent, run))
        assert len(start) == 6 and not start & set(asked)
    # both strategies of a seed start from the same images; the seeds differ
    starts = {
        p.parent.relative_to(out).as_posix(): p.read_text() for p in out.glob("*/seed-*/start.csv")
    }
    assert starts["entropy/seed-0"] == starts["random/seed-0"] != starts["random/seed-1"]
    audit = list(csv.DictReader(open(out / "entropy" / "seed-0" / "oracle.csv", newline="")))
    assert len(audit) == 8 and all(a["label"] in CLASSES for a in audit)

    # a rerun resumes: nothing is trained or asked again and checkpoints stay as they were
    trained, n_asked = checkpoints(out), len(oracle_questions(out))
    again = sim.simulate(cfg, settings(sim_setup, start_size=6))
    assert checkpoints(out) == trained and len(oracle_questions(out)) == n_asked
    assert again.rows == r.rows

    # one more round for one run trains exactly one more model and asks about its 4 images
    sim.simulate(
        cfg, settings(sim_setup, strategies=("entropy",), seeds=(1,), rounds=3, start_size=6)
    )
    after = checkpoints(out)
    assert set(after) - set(trained) == {"entropy/seed-1/checkpoints/round-003.pt"}
    assert all(after[k] == trained[k] for k in trained)
    assert len(oracle_questions(out)) == n_asked + 4


def test_interrupted_round_is_finished_not_redone(sim_setup):
    cfg = load_config(sim_setup["config"])
    s = settings(sim_setup, strategies=("bald",), seeds=(0,), rounds=1)
    sim.simulate(cfg, s)
    run_cfg = sim.plan_runs(cfg, s)[0][0].cfg
    # interrupted after exporting round 2 (before the oracle answered)
    exported = api.query(run_cfg, progress=False)
    manifest = exported.folder / "manifest.csv"
    written = manifest.stat().st_mtime_ns, manifest.read_bytes()
    sim.simulate(cfg, settings(sim_setup, strategies=("bald",), seeds=(0,), rounds=2))
    # the pending round was answered, not queried (exported) again
    assert (manifest.stat().st_mtime_ns, manifest.read_bytes()) == written
    st = api.status(run_cfg)
    assert [r["round"] for r in st.rounds] == [1, 2]
    assert [m["round"] for m in st.models] == [0, 1, 2]
    assert all(r["ingested"] for r in st.rounds)
    assert st.rounds[-1]["folder"] == str(exported.folder)
    # the round split by the interruption has no whole-round time; the others have
    rows = {x["round"]: x for x in csv.DictReader(open(sim_setup["out"] / "results.csv"))}
    assert rows["2"]["query_seconds"] == rows["2"]["round_seconds"] == ""
    assert float(rows["1"]["round_seconds"]) >= float(rows["1"]["query_seconds"]) > 0


def test_other_settings_are_refused(sim_setup):
    cfg = load_config(sim_setup["config"])
    sim.simulate(cfg, settings(sim_setup, strategies=("random",), seeds=(0,), rounds=0))
    with pytest.raises(sim.SimulationError, match="other settings"):
        sim.simulate(
            cfg, settings(sim_setup, strategies=("random",), seeds=(0,), rounds=0, budget=5)
        )


def test_oracle_answers_only_manifest_rows(tmp_path):
    folder = tmp_path / "round-001"
    folder.mkdir()
    (folder / "manifest.csv").write_text(
        "file,image_id,source_path,rank\n001_a.png,a,/data/x.png,1\n002_b.png,b,'=y.png,2\n"
    )
    (folder / "labels.csv").write_text("file,label\n001_a.png,\n002_b.png,\n")
    asked = []

    def lookup(p: str) -> str:
        asked.append(p)
        return "normal"

    assert sim.Oracle(lookup).label_round(folder, folder / "manifest.csv") == 2
    assert asked == ["/data/x.png", "=y.png"]
    rows = list(csv.DictReader(open(folder / "labels.csv", newline="")))
    assert [(r["file"], r["label"]) for r in rows] == [
        ("001_a.png", "normal"),
        ("002_b.png", "normal"),
    ]
    (folder / "labels.csv").write_text("file,label\n003_c.png,\n")
    with pytest.raises(sim.SimulationError, match="no source path"):
        sim.Oracle(lookup).label_round(folder, folder / "manifest.csv")
    with pytest.raises(sim.SimulationError, match="not in the simulation's labelled set"):
        sim.Truth([]).lookup("/data/x.png")


def test_start_sets(tmp_path):
    entries = [
        sim.TruthEntry(tmp_path / f"{c}{i}.png", c, tmp_path / "pool" / f"{c}{i}.png")
        for c in CLASSES
        for i in range(10)
    ]
    bal = sim.choose_start(entries, "class_balanced", 5, 0, CLASSES)
    assert sorted(e.label for e in bal) == ["normal"] * 3 + ["pneumonia"] * 2
    assert sim.choose_start(entries, "class_balanced", 5, 0, CLASSES) == bal
    assert sim.choose_start(entries, "class_balanced", 5, 1, CLASSES) != bal
    one = sim.choose_start(entries, "class:Pneumonia", 4, 0, CLASSES)
    assert len(one) == 4 and {e.label for e in one} == {"pneumonia"}
    assert len(sim.choose_start(entries, "random", 7, 3, CLASSES)) == 7
    listed = tmp_path / "start.txt"
    listed.write_text("normal1.png\npneumonia2.png\n")
    assert [e.source.name for e in sim.choose_start(entries, str(listed), 0, 0, CLASSES)] == [
        "normal1.png",
        "pneumonia2.png",
    ]
    (tmp_path / "start.csv").write_text("file,label\nnormal3.png,normal\n")
    assert [
        e.label for e in sim.choose_start(entries, str(tmp_path / "start.csv"), 0, 0, CLASSES)
    ] == ["normal"]
    listed.write_text("elsewhere.png\n")
    with pytest.raises(sim.SimulationError, match="not in the labelled set"):
        sim.choose_start(entries, str(listed), 0, 0, CLASSES)
    with pytest.raises(sim.SimulationError, match="start must be one of"):
        sim.choose_start(entries, "balanced", 4, 0, CLASSES)
    with pytest.raises(sim.SimulationError, match="11 images of class"):
        sim.choose_start(entries, "class:normal", 11, 0, CLASSES)


def test_summary_reach_and_area():
    rows = []
    for seed in (0, 1):
        for rnd, (lab, r_auc, b_auc) in enumerate([(10, 0.6, 0.6), (20, 0.7, 0.8), (30, 0.8, 0.9)]):
            for strategy, v in (("random", r_auc), ("bald", b_auc)):
                rows.append(
                    {
                        "strategy": strategy,
                        "seed": seed,
                        "round": rnd,
                        "labels": lab,
                        "test/auroc": v,
                        "test/accuracy": 0.5,
                        "test/balanced_accuracy": 0.5 if strategy == "bald" else 0.6,
                    }
                )
    md = sim.summarise(rows)
    auroc = md.split("### test AUROC")[1].split("###")[0]
    assert "| random | 2 | 30 | 0.800 ± 0.000 | 0.700 ± 0.000 |" in auroc
    assert "| bald | 2 | 30 | 0.900 ± 0.000 | 0.775 ± 0.000 |" in auroc
    # per seed: final / area, strategies as columns (random first)
    assert "| seed | random | bald |" in auroc
    assert "| 1 | 0.800 / 0.700 | 0.900 / 0.775 |" in auroc
    # labels to reach random's final 0.800, per seed
    assert "Labels to reach random's final 0.800" in auroc
    assert "| random | 2/2 | 30 | 30 |" in auroc and "| bald | 2/2 | 20 | 20 |" in auroc
    bal = md.split("### test balanced accuracy")[1]
    assert "| bald | 0/2 | never (≤30) | never (≤30) |" in bal


def test_labels_to_reach_lists_every_seed_and_marks_misses():
    """Old summaries averaged only the seeds that reached the target; each seed is listed."""
    rows = []
    curves = {
        ("random", 0): [0.6, 0.7, 0.8],
        ("random", 1): [0.6, 0.7, 0.8],
        ("bald", 0): [0.6, 0.85, 0.9],
        ("bald", 1): [0.6, 0.7, 0.75],
    }
    for (strategy, seed), ys in curves.items():
        for rnd, y in enumerate(ys):
            rows.append(
                {
                    "strategy": strategy,
                    "seed": seed,
                    "round": rnd,
                    "labels": 20 + 10 * rnd,
                    "test/auroc": y,
                }
            )
    auroc = sim.summarise(rows).split("### test AUROC")[1]
    assert "| bald | 1/2 | 30 | never (≤40) |" in auroc


def test_paired_difference_and_t_interval_by_hand():
    """strategy − random per seed, mean and 95% t interval, checked against values by hand."""
    # labels 20, 30, 40 for every run; normalised area = (y0 + 2 y1 + y2) / 4
    random = {0: [0.6, 0.7, 0.8], 1: [0.5, 0.7, 0.9], 2: [0.6, 0.6, 0.7]}
    bald = {0: [0.6, 0.8, 0.9], 1: [0.5, 0.6, 0.8], 2: [0.6, 0.8, 0.9]}
    rows = [
        {"strategy": strategy, "seed": seed, "round": rnd, "labels": 20 + 10 * rnd, "test/auroc": y}
        for strategy, by_seed in (("random", random), ("bald", bald))
        for seed, ys in by_seed.items()
        for rnd, y in enumerate(ys)
    ]
    # areas: random 0.70, 0.70, 0.625; bald 0.775, 0.625, 0.775
    d_area = [0.075, -0.075, 0.15]
    d_final = [0.1, -0.1, 0.2]
    (diff,) = sim.paired_differences(sim.curves(rows, "test/auroc"))
    assert diff.strategy == "bald" and diff.seeds == (0, 1, 2)
    assert diff.area == pytest.approx(d_area) and diff.final == pytest.approx(d_final)
    # by hand: mean 0.05, sd = sqrt(((0.025)^2 + (0.125)^2 + (0.1)^2) / 2) = 0.114564...,
    # t(0.975, 2) = 4.302653, half width = 4.302653 * 0.114564 / sqrt(3) = 0.284590
    mean, lo, hi = sim.t_interval(d_area)
    assert mean == pytest.approx(0.05)
    assert lo == pytest.approx(0.05 - 0.284590, abs=1e-5)
    assert hi == pytest.approx(0.05 + 0.284590, abs=1e-5)
    # final: mean 0.0667, sd = sqrt((0.0333^2 + 0.1667^2 + 0.1333^2) / 2) = 0.152753, half
    # width = 4.302653 * 0.152753 / sqrt(3) = 0.379454
    mean, lo, hi = sim.t_interval(d_final)
    assert (mean, lo, hi) == pytest.approx((0.066667, -0.312787, 0.446121), abs=1e-5)
    md = sim.summarise(rows)
    assert (
        "| bald | 3 | +0.075, -0.075, +0.150 | +0.050 [-0.235, +0.335] "
        "| +0.100, -0.100, +0.200 | +0.067 [-0.313, +0.446] |"
    ) in md
    assert sim.t_interval([0.1]) == (0.1, None, None)
    one = [r for r in rows if r["seed"] == 0]
    assert "+0.075 (n = 1, no interval)" in sim.summarise(one)


def test_undefined_metrics_are_left_out_with_a_note(tmp_path):
    """NaN (from training) and None (read back from the ledger) points are skipped, counted in
    a note, written as empty cells, and plotting still works."""
    rows = []
    for strategy in ("random", "bald"):
        for rnd in range(3):
            v = 0.6 + 0.1 * rnd
            if (strategy, rnd) == ("bald", 0):
                v = None
            elif (strategy, rnd) == ("random", 1):
                v = float("nan")
            rows.append(
                {
                    "strategy": strategy,
                    "seed": 0,
                    "round": rnd,
                    "labels": 10 * (rnd + 1),
                    "labels_train": 8 * (rnd + 1),
                    "labels_holdout": 2,
                    "train_seconds": 1.0,
                    "score_seconds": "",
                    "test/auroc": v,
                    "test/accuracy": 0.5,
                    "test/balanced_accuracy": 0.5,
                }
            )
    assert sim.undefined_points(rows, "test/auroc") == [("bald", 0, 0), ("random", 0, 1)]
    data = sim.curves(rows, "test/auroc")
    assert data["bald"][0][0].tolist() == [20, 30] and data["random"][0][0].tolist() == [10, 30]
    md = sim.summarise(rows)
    auroc = md.split("### test AUROC")[1].split("###")[0]
    assert (
        "Note: test AUROC is undefined at 2 of 6 points, left out of curves and tables "
        "(bald seed 0 round 0; random seed 0 round 1)"
    ) in auroc
    assert "undefined" not in md.split("### test accuracy")[1]
    assert "| random | 1 | 30 | 0.800 ± 0.000 | 0.700 ± 0.000 |" in auroc
    sim.write_results(tmp_path / "results.csv", rows)
    written = list(csv.DictReader(open(tmp_path / "results.csv", newline="")))
    assert [r["test/auroc"] for r in written] == ["0.6", "", "0.8", "", "0.7", "0.8"]
    assert list(written[0])[:6] == [
        "strategy",
        "seed",
        "round",
        "labels",
        "labels_train",
        "labels_holdout",
    ]
    # read back from the CSV (empty cells) the same points are undefined
    assert sim.undefined_points(written, "test/auroc") == [("bald", 0, 0), ("random", 0, 1)]
    assert [p.name for p in sim.plot_curves(rows, tmp_path)] == [
        "curve_test_auroc.png",
        "curve_test_accuracy.png",
        "curve_test_balanced_accuracy.png",
    ]
    # every point undefined: a note, no table, no crash
    none = [dict(r, **{"test/auroc": None}) for r in rows]
    assert "test AUROC is undefined at 6 of 6 points" in sim.summarise(none)
    fmt = sim.format_metric
    assert fmt(None) == fmt(float("nan")) == fmt("") == "–"
    # a metric no row records is not "undefined"
    assert sim.undefined_points(rows, "test/ece") == []


def test_cli_runs_in_parallel_workers(sim_setup, capsys):
    args = [
        "-c",
        str(sim_setup["config"]),
        "-q",
        "--truth",
        str(sim_setup["truth"][0]),
        "--truth",
        str(sim_setup["truth"][1]),
        "--strategies",
        "random,bald",
        "--seeds",
        "3",
        "--rounds",
        "1",
        "--budget",
        "4",
        "--start",
        "random",
        "--start-size",
        "6",
        "--out",
        str(sim_setup["out"]),
        "--workers",
        "2",
        "--threads",
        "1",
    ]
    from medal.cli import main

    assert main(["simulate", *args]) == 0
    out = capsys.readouterr().out
    assert "### test AUROC" in out and "simulation finished" in out
    rows = list(csv.DictReader(open(sim_setup["out"] / "results.csv", newline="")))
    assert sorted((r["strategy"], r["round"], r["labels"]) for r in rows) == [
        ("bald", "0", "6"),
        ("bald", "1", "10"),
        ("random", "0", "6"),
        ("random", "1", "10"),
    ]
    assert (sim_setup["out"] / "cache").is_dir() and any((sim_setup["out"] / "cache").iterdir())
    assert main(["simulate", *args[:-4], "--strategies", "nope"]) == 2
    assert "unknown strategy nope" in capsys.readouterr().err


def test_single_class_start_runs(sim_setup, capsys):
    """One pneumonia image is held out, so validation AUROC is undefined every round: the
    simulation runs to the end and the undefined values are empty cells in results.csv."""
    cfg = load_config(sim_setup["config"])
    r = sim.simulate(
        cfg,
        settings(
            sim_setup,
            strategies=("bald",),
            seeds=(0,),
            rounds=1,
            start="class:pneumonia",
            verbose=True,
        ),
    )
    printed = capsys.readouterr().out
    assert (
        "[bald seed 0] model round 0: 4 labels given (3 in training, 1 held out for "
        "validation), AUROC " in printed
    )
    assert "model round 1: 8 labels given (7 in training, 1 held out" in printed
    start = list(csv.DictReader(open(sim_setup["out"] / "bald" / "seed-0" / "start.csv")))
    assert len(start) == 4 and {s["label"] for s in start} == {"pneumonia"}
    assert [row["labels"] for row in r.rows] == [4, 8] and not r.failures
    assert [row["labels_holdout"] for row in r.rows] == [1, 1]
    assert all(sim.parse_metric(row["validation/auroc"]) is None for row in r.rows)
    written = list(csv.DictReader(open(sim_setup["out"] / "results.csv", newline="")))
    assert [row["validation/auroc"] for row in written] == ["", ""]
    assert all(row["test/auroc"] for row in written)


def test_passed_validation_set_is_used_and_not_counted(sim_setup):
    cfg = load_config(sim_setup["config"])
    r = sim.simulate(
        cfg,
        settings(
            sim_setup,
            strategies=("random",),
            seeds=(0,),
            rounds=0,
            start_size=6,
            validation="config",
        ),
    )
    (row,) = r.rows
    assert (row["labels"], row["labels_train"], row["labels_holdout"]) == (6, 6, 0)
    assert row["validation/n"] == 16  # data/validation of the config, 8 per class
    assert "labelled validation set" in r.summary and "not counted" in r.summary
    with pytest.raises(sim.SimulationError, match="validation must be none, config or"):
        sim.plan_runs(
            cfg, settings(sim_setup, out=sim_setup["out"].parent / "other", validation="nowhere")
        )


def test_honest_defaults(sim_setup):
    """Random start, no validation set, 5 seeds: in the library, the CLI and the benchmark."""
    import argparse

    s = sim.SimulationSettings(
        truth=(), out=Path("x"), strategies=("random",), seeds=(0,), rounds=1, budget=1
    )
    assert (s.start, s.validation) == ("random", "none")
    from medal.cli import add_simulate_arguments

    p = argparse.ArgumentParser()
    add_simulate_arguments(p)
    a = p.parse_args(["-c", "c.toml", "--truth", "t"])
    assert (a.start, a.validation, a.seeds) == ("random", "none", "0,1,2,3,4")
    cfg = load_config(sim_setup["config"])
    assert sim.with_validation(cfg, "none").data.validation is None
    assert sim.with_validation(cfg, "config").data.validation == cfg.data.validation
    bench = load_script("bench_simulation")
    b = bench.parser().parse_args([])
    assert (b.start, b.seeds, b.validation) == ("random", "0,1,2,3,4", False)


def test_run_progress_says_run_k_of_n_and_the_time_left():
    from medal.simulate import run_progress

    assert run_progress(2, 5, 120.0, "bald/seed-1") == (
        "run 2 of 5 finished (bald/seed-1); 2.0 min so far, about 3.0 min left"
    )
    assert run_progress(5, 5, 300.0, "random/seed-4") == (
        "run 5 of 5 finished (random/seed-4); 5.0 min so far"
    )


@pytest.mark.parametrize(
    "backbones, workers, image_cache", [("per-seed", 2, True), ("shared", 1, False)]
)
def test_backbones_per_seed_or_shared(sim_setup, backbones, workers, image_cache, capsys):
    """--backbones per-seed pretrains one self-supervised backbone per seed before the runs
    (in worker processes when there are several), shared one for all; no run pretrains its
    own (also without the decode cache), and the summary says which."""
    over = {
        "representation.method": "simclr",
        "representation.epochs": 1,
        "representation.batch_size": 8,
        "train.freeze_backbone": True,
        "train.validation_fraction": 0.0,
        "image.cache": image_cache,
    }
    cfg = load_config(sim_setup["config"], over)
    r = sim.simulate(
        cfg,
        settings(
            sim_setup,
            strategies=("random", "bald"),
            seeds=(0, 1),
            rounds=1,
            start="random",
            start_size=6,
            workers=workers,
            threads=1,
            backbones=backbones,
            verbose=True,
        ),
    )
    printed = capsys.readouterr().out
    assert not r.failures
    cached = sorted((sim_setup["out"] / "cache" / "representation").glob("*.pt"))
    assert len(cached) == (2 if backbones == "per-seed" else 1)
    every = {p.resolve() for p in sim_setup["out"].glob("**/representation/*.pt")}
    assert every == {p.resolve() for p in cached}  # no run pretrained a backbone of its own
    shared = {p.name for p in (sim_setup["out"] / "cache").iterdir()}
    if image_cache:  # the decode cache is shared too
        assert shared - {"representation", "features"}
    else:
        assert shared == {"representation", "features"}
    assert printed.count("self-supervised backbone pretrained") == len(cached)
    if backbones == "per-seed":
        assert "backbone seed 0: " in printed and "backbone seed 1: " in printed
        assert "one self-supervised pretraining per seed" in r.summary
        # each seed's runs load that seed's backbone: the representation seed is the run's
        for spec in sim.plan_runs(
            cfg,
            settings(
                sim_setup,
                strategies=("random", "bald"),
                seeds=(0, 1),
                rounds=1,
                start="random",
                start_size=6,
                backbones=backbones,
            ),
        )[0]:
            assert api.representation_seed(spec.cfg) == spec.seed
    else:
        assert "representation.seed = 0) for every run" in r.summary
    with pytest.raises(sim.SimulationError, match="differs in: backbones"):
        sim.plan_runs(
            cfg,
            settings(
                sim_setup,
                strategies=("random", "bald"),
                seeds=(0, 1),
                rounds=1,
                start="random",
                start_size=6,
                backbones="shared" if backbones == "per-seed" else "per-seed",
            ),
        )
    with pytest.raises(sim.SimulationError, match="backbones must be one of per-seed, shared"):
        sim.plan_runs(
            cfg, settings(sim_setup, out=sim_setup["out"].parent / "o2", backbones="each")
        )


def test_summary_says_where_the_time_went(tmp_path):
    from medal.simulate.records import record_pretraining_seconds

    rows = [
        {"strategy": "random", "seed": 0, "round": 0, "labels": 10, "test/auroc": 0.6}
        | {"train_seconds": 2.0, "score_seconds": "", "query_seconds": "", "round_seconds": 3.0},
        {"strategy": "random", "seed": 0, "round": 1, "labels": 20, "test/auroc": 0.7}
        | {"train_seconds": 4.0, "score_seconds": 1.0, "query_seconds": 1.5, "round_seconds": 7.0},
    ]
    path = tmp_path / "pretraining_seconds.json"
    assert record_pretraining_seconds(path, {"backbone seed 0": 30.0}) == {"backbone seed 0": 30.0}
    # a resumed simulation loads the backbone from the cache in 0.1 s: the pretraining's 30 s stay
    again = record_pretraining_seconds(path, {"backbone seed 0": 0.1, "backbone seed 1": 20.0})
    assert again == {"backbone seed 0": 30.0, "backbone seed 1": 20.0}
    table = sim.summarise(rows, again).split("### Time by part")[1]
    assert "| self-supervised pretraining (2 backbones) | 50.0 | 2 | 25.00 |" in table
    assert "| training (fitting the model) | 6.0 | 2 | 3.00 |" in table
    assert "| MC scoring and selection | 1.0 | 1 | 1.00 |" in table
    assert "| export of the round folder | 0.5 | 1 | 0.50 |" in table
    assert "| whole rounds (query, labelling, ingest, training) | 10.0 | 2 | 5.00 |" in table
