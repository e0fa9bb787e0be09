#!/usr/bin/env python3
"""How good is a backbone's representation of PneumoniaMNIST? A linear probe outside medal's
training: scikit-learn logistic regression (C=1, standardised features) on the backbone's
features of 20 / 60 / 220 / all pool images drawn at random (3 draws each); test AUROC on the
official test split. Compare a cached self-supervised backbone with an untrained one:

    python scripts/probe_representation.py <workspace>/cache/representation/<key>.pt
    python scripts/probe_representation.py --untrained

Needs `python scripts/prepare_pneumoniamnist.py` first. small_cnn, 1 channel, 28x28.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medal.data import load_all
from medal.models import MCModel, create_model

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "data" / "pneumoniamnist" / "images"


@torch.no_grad()
def features(model: MCModel, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features ``[M, D]`` of the readable ``paths`` and their indices ``[M]``."""
    x, kept, _ = load_all(paths, channels=1, size=28)
    f = torch.cat([model.backbone(x[i : i + 512]) for i in range(0, len(x), 512)])
    return f.numpy(), kept


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("backbone", nargs="?", type=Path, help="a cached backbone (.pt)")
    which.add_argument("--untrained", action="store_true", help="probe an untrained backbone")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("small_cnn", 2)
    if not a.untrained:
        if not a.backbone.is_file():
            print(f"error: {a.backbone}: no such backbone file", file=sys.stderr)
            return 2
        model.backbone.load_state_dict(torch.load(a.backbone, weights_only=True))
    model.eval()
    with open(DATA / "pool_truth.csv", newline="") as f:
        truth = list(csv.DictReader(f))
    pool = [DATA / r["file"] for r in truth]
    y = np.array([r["label"] == "pneumonia" for r in truth], int)
    test = sorted((DATA / "test").rglob("*.png")) + sorted((DATA / "test").rglob("*.dcm"))
    y_test = np.array([p.parent.name == "pneumonia" for p in test], int)
    f_pool, kept = features(model, pool)
    y = y[kept]
    f_test, kept_test = features(model, test)
    y_test = y_test[kept_test]
    for n in (20, 60, 220, len(y)):
        aurocs = []
        for draw in range(3):
            idx = np.random.default_rng(draw).choice(len(y), n, replace=False)
            if len(set(y[idx])) < 2:
                continue
            scaler = StandardScaler().fit(f_pool[idx])
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(
                scaler.transform(f_pool[idx]), y[idx]
            )
            p = clf.predict_proba(scaler.transform(f_test))[:, 1]
            aurocs.append(roc_auc_score(y_test, p))
        print(
            f"{n:>5} labels: test AUROC per draw {np.round(aurocs, 3).tolist()}, "
            f"mean {np.mean(aurocs):.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
