"""medal simulate: tiny simulations on generated PNG/DICOM data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medal import api
from medal import simulate as sim
from medal.config import load_config

from conftest import CLASSES, make_image, save, write_config


@pytest.fixture
def sim_setup(tmp_path: Path, tiny_data: dict) -> dict:
    """Config with a test split, and the fully labelled set: labelled/ plus a pool truth CSV."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(CLASSES):
        for i in range(6):
            save(tmp_path / "data" / "test" / name / f"t{i}.png", make_image(c, rng))
    cfg_path = write_config(tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace(
        'validation = "data/validation"\n',
        'validation = "data/validation"\ntest = "data/test"\n'))
    truth_csv = tmp_path / "pool_truth.csv"
    with open(truth_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows(sorted(tiny_data["truth"].items()))
    return {"config": cfg_path, "truth": (truth_csv, tmp_path / "data" / "labelled"),
            "out": tmp_path / "sim", "all_truth": tiny_data["truth"]}


def settings(setup: dict, **kw) -> sim.SimulationSettings:
    base = dict(truth=setup["truth"], out=setup["out"], strategies=("entropy", "random"),
                seeds=(0, 1), rounds=2, budget=4, start="class_balanced", start_size=4,
                verbose=False)
    return sim.SimulationSettings(**(base | kw))


class Spy:
    """Counts calls to a function and remembers the first argument of each."""

    def __init__(self, fn):
        self.fn, self.args = fn, []

    def __call__(self, *a, **kw):
        self.args.append(a[0] if a else None)
        return self.fn(*a, **kw)


def exported_sources(out: Path, run: Path | None = None) -> list[str]:
    """Source paths of every image exported in the round folders of every run (or of one)."""
    found = []
    pattern = f"{run.relative_to(out).as_posix() if run else '*/seed-*'}/labelling/round-*/"
    for manifest in sorted(out.glob(pattern + "manifest.csv")):
        with open(manifest, newline="") as f:
            found += [r["source_path"] for r in csv.DictReader(f)]
    return found


def test_simulation_writes_results_plots_summary_and_resumes(sim_setup, monkeypatch, capsys):
    cfg = load_config(sim_setup["config"])
    real_lookup = sim.Truth.lookup
    lookup = Spy(lambda path, truth: real_lookup(truth, path))
    monkeypatch.setattr(sim.Truth, "lookup", lambda self, path: lookup(path, self))
    train = Spy(api.train)
    monkeypatch.setattr(api, "train", train)

    r = sim.simulate(cfg, settings(sim_setup))
    out = sim_setup["out"].resolve()

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3 and len(train.args) == 12
    assert {(x["strategy"], x["seed"], x["round"]) for x in rows} == {
        (s, str(k), str(n)) for s in ("entropy", "random") for k in (0, 1) for n in (0, 1, 2)}
    assert [int(x["labels"]) for x in rows if x["strategy"] == "entropy" and x["seed"] == "0"] \
        == [4, 8, 12]
    cols = set(rows[0])
    assert {"train_seconds", "score_seconds", "test/auroc", "test/accuracy",
            "test/balanced_accuracy", "test/loss", "test/ece", "validation/auroc",
            "test/sensitivity/normal", "test/confusion/normal/pneumonia"} <= cols
    assert all(float(x["test/n"]) == 12 for x in rows)
    assert all(x["score_seconds"] == "" for x in rows if x["round"] == "0")
    assert all(float(x["score_seconds"]) >= 0 for x in rows if x["round"] != "0")
    for metric in sim.MAIN_METRICS:
        png = out / f"curve_test_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "labels to reach random's final" in summary and "| entropy | 2 | 12 |" in summary
    assert r.summary == summary and not r.failures

    # the oracle was asked about exported images only (each once), never about the start sets
    exported = exported_sources(out)
    assert len(exported) == 2 * 2 * 2 * 4
    assert sorted(lookup.args) == sorted(exported)
    for run in out.glob("*/seed-*"):
        start = {row["file"] for row in csv.DictReader(open(run / "start.csv", newline=""))}
        asked = [a["source_path"] for a in csv.DictReader(open(run / "oracle.csv", newline=""))]
        assert sorted(asked) == sorted(exported_sources(run.parent.parent, run))
        assert len(start) == 4 and not start & set(asked)
    # both strategies of a seed start from the same images; the seeds differ
    starts = {p.parent.relative_to(out).as_posix(): p.read_text()
              for p in out.glob("*/seed-*/start.csv")}
    assert starts["entropy/seed-0"] == starts["random/seed-0"] != starts["random/seed-1"]
    audit = list(csv.DictReader(open(out / "entropy" / "seed-0" / "oracle.csv", newline="")))
    assert len(audit) == 8 and all(a["label"] in CLASSES for a in audit)

    # a rerun resumes: nothing is trained or asked again and checkpoints stay as they were
    ckpt = out / "random" / "seed-1" / "checkpoints" / "round-002.pt"
    mtime = ckpt.stat().st_mtime_ns
    n_lookups = len(lookup.args)
    again = sim.simulate(cfg, settings(sim_setup))
    assert len(train.args) == 12 and len(lookup.args) == n_lookups
    assert ckpt.stat().st_mtime_ns == mtime
    assert again.rows == r.rows

    # one more round for one run trains exactly one more model
    sim.simulate(cfg, settings(sim_setup, strategies=("entropy",), seeds=(1,), rounds=3))
    assert len(train.args) == 12 + 1
    assert len(lookup.args) == n_lookups + 4


def test_interrupted_round_is_finished_not_redone(sim_setup, monkeypatch):
    cfg = load_config(sim_setup["config"])
    s = settings(sim_setup, strategies=("bald",), seeds=(0,), rounds=1)
    sim.simulate(cfg, s)
    run_cfg = sim.plan_runs(cfg, s)[0][0].cfg
    # interrupted after exporting round 2 (before the oracle answered)
    exported = api.query(run_cfg, progress=False)
    query = Spy(api.query)
    monkeypatch.setattr(api, "query", query)
    sim.simulate(cfg, settings(sim_setup, strategies=("bald",), seeds=(0,), rounds=2))
    assert query.args == []  # the pending round was answered, not queried again
    st = api.status(run_cfg)
    assert [m["round"] for m in st.models] == [0, 1, 2]
    assert all(r["ingested"] for r in st.rounds)
    assert st.rounds[-1]["folder"] == str(exported.folder)


def test_other_settings_are_refused(sim_setup):
    cfg = load_config(sim_setup["config"])
    sim.simulate(cfg, settings(sim_setup, strategies=("random",), seeds=(0,), rounds=0))
    with pytest.raises(sim.SimulationError, match="other settings"):
        sim.simulate(cfg, settings(sim_setup, strategies=("random",), seeds=(0,), rounds=0,
                                   budget=5))


def test_oracle_answers_only_manifest_rows(tmp_path):
    folder = tmp_path / "round-001"
    folder.mkdir()
    (folder / "manifest.csv").write_text("file,image_id,source_path,rank\n"
                                         "001_a.png,a,/data/x.png,1\n002_b.png,b,'=y.png,2\n")
    (folder / "labels.csv").write_text("file,label\n001_a.png,\n002_b.png,\n")
    asked = []

    def lookup(p: str) -> str:
        asked.append(p)
        return "normal"

    assert sim.Oracle(lookup).label_round(folder, folder / "manifest.csv") == 2
    assert asked == ["/data/x.png", "=y.png"]
    rows = list(csv.DictReader(open(folder / "labels.csv", newline="")))
    assert [(r["file"], r["label"]) for r in rows] == [("001_a.png", "normal"),
                                                      ("002_b.png", "normal")]
    (folder / "labels.csv").write_text("file,label\n003_c.png,\n")
    with pytest.raises(sim.SimulationError, match="no source path"):
        sim.Oracle(lookup).label_round(folder, folder / "manifest.csv")
    with pytest.raises(sim.SimulationError, match="not in the simulation's labelled set"):
        sim.Truth([]).lookup("/data/x.png")


def test_start_sets(tmp_path):
    entries = [sim.TruthEntry(tmp_path / f"{c}{i}.png", c, tmp_path / "pool" / f"{c}{i}.png")
               for c in CLASSES for i in range(10)]
    bal = sim.choose_start(entries, "class_balanced", 5, 0, CLASSES)
    assert sorted(e.label for e in bal) == ["normal"] * 3 + ["pneumonia"] * 2
    assert sim.choose_start(entries, "class_balanced", 5, 0, CLASSES) == bal
    assert sim.choose_start(entries, "class_balanced", 5, 1, CLASSES) != bal
    one = sim.choose_start(entries, "class:Pneumonia", 4, 0, CLASSES)
    assert len(one) == 4 and {e.label for e in one} == {"pneumonia"}
    assert len(sim.choose_start(entries, "random", 7, 3, CLASSES)) == 7
    listed = tmp_path / "start.txt"
    listed.write_text("normal1.png\npneumonia2.png\n")
    assert [e.source.name for e in sim.choose_start(entries, str(listed), 0, 0, CLASSES)] == \
        ["normal1.png", "pneumonia2.png"]
    (tmp_path / "start.csv").write_text("file,label\nnormal3.png,normal\n")
    assert [e.label for e in sim.choose_start(entries, str(tmp_path / "start.csv"), 0, 0,
                                              CLASSES)] == ["normal"]
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
        for rnd, (lab, r_auc, b_auc) in enumerate([(10, 0.6, 0.6), (20, 0.7, 0.8),
                                                   (30, 0.8, 0.9)]):
            for strategy, v in (("random", r_auc), ("bald", b_auc)):
                rows.append({"strategy": strategy, "seed": seed, "round": rnd, "labels": lab,
                             "test/auroc": v, "test/accuracy": 0.5,
                             "test/balanced_accuracy": 0.5 if strategy == "bald" else 0.6})
    md = sim.summarise(rows)
    auroc = md.split("### test AUROC")[1].split("###")[0]
    assert "| random | 2 | 30 | 0.800 ± 0.000 | 30 ± 0 | 0.700 ± 0.000 |" in auroc
    assert "| bald | 2 | 30 | 0.900 ± 0.000 | 20 ± 0 | 0.775 ± 0.000 |" in auroc
    assert "| bald | 2 | 30 | 0.500 ± 0.000 | not reached |" in md


def test_cli_runs_in_parallel_workers(sim_setup, capsys):
    args = ["-c", str(sim_setup["config"]), "-q", "--truth", str(sim_setup["truth"][0]),
            "--truth", str(sim_setup["truth"][1]), "--strategies", "random,bald",
            "--seeds", "3", "--rounds", "1", "--budget", "4", "--start", "random",
            "--start-size", "6", "--out", str(sim_setup["out"]), "--workers", "2",
            "--threads", "1"]
    assert sim.main(args) == 0
    out = capsys.readouterr().out
    assert "### test AUROC" in out and "simulation finished" in out
    rows = list(csv.DictReader(open(sim_setup["out"] / "results.csv", newline="")))
    assert sorted((r["strategy"], r["round"], r["labels"]) for r in rows) == [
        ("bald", "0", "6"), ("bald", "1", "10"), ("random", "0", "6"), ("random", "1", "10")]
    assert (sim_setup["out"] / "cache").is_dir() and any((sim_setup["out"] / "cache").iterdir())
    assert sim.main([*args[:-4], "--strategies", "nope"]) == 2
    assert "unknown strategy nope" in capsys.readouterr().err


def test_single_class_start_runs(sim_setup):
    cfg = load_config(sim_setup["config"])
    r = sim.simulate(cfg, settings(sim_setup, strategies=("bald",), seeds=(0,), rounds=1,
                                   start="class:pneumonia"))
    start = list(csv.DictReader(open(sim_setup["out"] / "bald" / "seed-0" / "start.csv")))
    assert len(start) == 4 and {s["label"] for s in start} == {"pneumonia"}
    assert [row["labels"] for row in r.rows] == [4, 8]
