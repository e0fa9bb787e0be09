"""An ordinary start through the CLI: few labels, several classes, with or without a validation
set. Metrics a small split cannot define are stored as missing and shown as '–'; nothing
crashes; the hold-out never takes a rare class's only labels away from training."""

from __future__ import annotations

import csv
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medal.cli import main
from medal.ledger import Ledger

NAMES = ("c0", "c1", "c2", "c3", "c4")


def _png(path: Path, label: int, rng: np.random.Generator) -> Path:
    img = rng.normal(100, 15, (12, 12))
    img[3:9, 3:9] += 30 * label - 50  # each class its own centre brightness
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def _start_counts(n_classes: int, rare: int, start: str) -> list[int]:
    """Labels per class: the last class has ``rare``; a 'random' start is uneven and, with five
    classes, has a class without any label (as a random draw of 25 RetinaMNIST images can)."""
    if start == "balanced":
        return [rare] * n_classes
    return [7, 3, 0, 4][: n_classes - 1] + [rare]


def _setup(tmp: Path, n_classes: int, rare: int, start: str, with_validation: bool) -> Path:
    rng = np.random.default_rng(n_classes * 100 + rare)
    classes = NAMES[:n_classes]
    counts = _start_counts(n_classes, rare, start)
    for c, k in enumerate(counts):
        for i in range(k):
            _png(tmp / "labelled" / classes[c] / f"l{i}.png", c, rng)
    truth = {}
    for i in range(12):
        c = i % n_classes
        p = _png(tmp / "pool" / f"p{i:02d}.png", c, rng)
        truth[p.name] = classes[c]
    validation = ""
    if with_validation:  # a small given validation set that lacks the last class
        for c in range(n_classes - 1):
            _png(tmp / "validation" / classes[c] / "v0.png", c, rng)
        validation = 'validation = "validation"'
    (tmp / "truth.csv").write_text("\n".join(f"{k},{v}" for k, v in truth.items()))
    cfg = tmp / "c.toml"
    cfg.write_text(
        f"""
workspace = "ws"
classes = {list(classes)!r}
[data]
labelled = "labelled"
pool = "pool"
{validation}
[model]
name = "small_cnn"
image_size = 12
hidden = 16
[train]
epochs = 1
min_steps = 3
batch_size = 8
freeze_backbone = false    # these cases are about the hold-out, which the probe does not take
validation_fraction = 0.2
[representation]
method = "none"
[query]
budget = 4
mc_samples = 4
""".replace("'", '"')
    )
    return cfg


CASES = [
    (n, rare, start, val)
    for n in (2, 5)
    for rare in (1, 2, 6)
    for start in ("balanced", "random")
    for val in (False, True)
]


@pytest.mark.parametrize(
    "n_classes,rare,start,with_validation",
    CASES,
    ids=[f"{n}cls-rare{r}-{s}-{'val' if v else 'noval'}" for n, r, s, v in CASES],
)
def test_ordinary_start_runs_and_shows_undefined(
    tmp_path, capsys, n_classes, rare, start, with_validation
):
    cfg = _setup(tmp_path, n_classes, rare, start, with_validation)
    c = ["-c", str(cfg), "-q"]
    counts = _start_counts(n_classes, rare, start)

    assert main(["train", *c]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    trained = dict(re.findall(r"(c\d) (\d+)", out.split("labels (", 1)[1].split(")", 1)[0]))
    for cls, given in zip(NAMES, counts):
        # the hold-out never takes the only examples (one or two) of a class from training
        assert int(trained[cls]) >= min(given, 2), (cls, given, out)

    ws = tmp_path / "ws"
    with Ledger(ws / "ledger.sqlite") as db:
        metrics = db.metrics().get(0, {})
    validation = metrics.get("validation")
    lacking = [
        cls
        for cls in NAMES[:n_classes]
        if validation is not None
        and sum(validation[f"confusion/{cls}/{d}"] for d in NAMES[:n_classes]) == 0
    ]
    if validation is not None:
        # undefined values are missing (NULL) in the ledger, NaN when read back
        raw = sqlite3.connect(ws / "ledger.sqlite")
        nulls = {
            r[0]
            for r in raw.execute(
                "SELECT name FROM metrics WHERE split='validation' AND value IS NULL"
            )
        }
        raw.close()
        assert nulls == {k for k, v in validation.items() if np.isnan(v)}
        if lacking:
            assert "auroc" in nulls and f"sensitivity/{lacking[0]}" in nulls
            assert "AUROC –" in out
            assert f"validation set has no {', '.join(lacking)} image" in out
            assert "selecting epochs by 'balanced_accuracy' instead" in out

    assert main(["query", *c]) == 0, capsys.readouterr().err
    folder = ws / "labelling" / "round-001"
    truth = dict(line.split(",") for line in (tmp_path / "truth.csv").read_text().splitlines())
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for r in rows:
            w.writerow([r["file"], truth[Path(r["source_path"]).name]])
    capsys.readouterr()
    assert main(["ingest", *c, str(folder)]) == 0, capsys.readouterr().err
    assert f"recorded {len(rows)} labels" in capsys.readouterr().out

    assert main(["status", *c]) == 0
    out = capsys.readouterr().out
    if lacking:
        assert re.search(r"model round 0: validation set has no .*shown as '–'", out)
        assert "–" in out.split("model  labels", 1)[1]
    assert "n/a" not in out and "nan" not in out.lower()


def test_metrics_of_a_version_1_ledger_are_migrated(tmp_path):
    """A ledger written before undefined metrics existed (value NOT NULL) is upgraded in place:
    its metrics kept, NULL accepted afterwards."""
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE metrics (round INTEGER NOT NULL, split TEXT NOT NULL, name TEXT NOT NULL,
                              value REAL NOT NULL, PRIMARY KEY (round, split, name));
        INSERT INTO metrics VALUES (0, 'test', 'auroc', 0.75);
    """)
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        assert ledger.metrics() == {0: {"test": {"auroc": 0.75}}}
        ledger.record_model(
            1, "ck.pt", 0, 4, 1, 0.1, {"validation": {"auroc": float("nan"), "accuracy": 0.5}}
        )
        m = ledger.metrics()[1]["validation"]
        assert np.isnan(m["auroc"]) and m["accuracy"] == 0.5
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "3"
    assert (
        raw.execute("SELECT value FROM metrics WHERE round=1 AND name='auroc'").fetchone()[0]
        is None
    )
    raw.close()
