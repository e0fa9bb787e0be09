#!/usr/bin/env python3
"""What the self-supervised representation buys, measured on a bundled dataset's official
train split (as the pool, labels hidden) and test split, with medal's own components:

1. the backbone is pretrained on the train images without labels (or loaded from the cache:
   ``api.pretrain_representation``, the step ``medal train``/``query`` run themselves);
2. zero-label start: TypiClust picks 20 images in that embedding, exactly as ``medal query``
   picks a project's first round, and the frozen-backbone head (``train.fit_probe``) trains on
   them; compared with 20 and 40 images drawn at random, per seed;
3. the full-label ceiling: the same head on every train label.

Prints one table (test AUROC; macro one-vs-rest for more than two classes) per seed, the mean,
and the paired difference "TypiClust 20 minus random 40" with a 95% t interval over seeds.

    python scripts/bench_representation.py                       # PneumoniaMNIST, seeds 0-4
    python scripts/bench_representation.py --dataset retinamnist

The configuration is the bundled config's, with the settings the README recommends for a
frozen self-supervised backbone (see --set to change any). Data: MedMNIST v2 (CC BY 4.0); run
``python scripts/prepare_<dataset>.py`` first (done here automatically when missing).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from medal import acquisition, api  # noqa: E402
from medal.config import load_config, parse_overrides  # noqa: E402
from medal.data import load_all, scan_source  # noqa: E402
from medal.representation import load_cached  # noqa: E402
from medal.train import (backbone_features, build_model, classification_metrics,  # noqa: E402
                         fit_probe, predict_deterministic)

DATASETS = ("pneumoniamnist", "retinamnist")
# frozen self-supervised backbone, linear head, no hold-out (the head's schedule is fixed)
PROBE: dict[str, object] = {
    "device": "cpu",
    "representation.method": "simclr",
    "train.freeze_backbone": True,
    "model.hidden": 0,
    "train.validation_fraction": 0.0,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="pneumoniamnist")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--first", type=int, default=20, help="size of the zero-label first round")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides (TOML values)")
    p.add_argument("--out", type=Path, default=None,
                   help="workspace (default runs/bench-representation-<dataset>)")
    return p


def prepare_dataset(name: str) -> Path:
    """The bundled dataset's folders, prepared with the prepare script's defaults (once)."""
    images = ROOT / "data" / name / "images"
    mod = importlib.import_module(f"prepare_{name}")
    if name == "pneumoniamnist":
        mod.prepare(images, labelled=20, dicom_fraction=0.1, seed=0, force=False)
    else:
        mod.prepare(images, labelled=25, seed=0, force=False)
    return images


def truth(images: Path, classes: tuple[str, ...]) -> list[tuple[Path, str]]:
    """The official train split with its labels: the labelled start folder + pool_truth.csv."""
    found: dict[Path, str] = {}
    for src in (images / "labelled", images / "pool_truth.csv"):
        for e in scan_source(src, classes):
            found[e.path.resolve()] = e.label
    return sorted(found.items())


def auroc(model: torch.nn.Module, x_test: torch.Tensor, y_test: np.ndarray, k: int) -> float:
    return classification_metrics(y_test, predict_deterministic(model, x_test,
                                                                torch.device("cpu")), k)["auroc"]


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    images = ROOT / "data" / a.dataset / "images"
    prepare_dataset(a.dataset)
    out = (a.out or ROOT / "runs" / f"bench-representation-{a.dataset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    over = {**PROBE, **parse_overrides(a.overrides)}
    base = load_config(ROOT / "configs" / f"{a.dataset}.toml", over)
    rows = truth(images, base.classes)
    labelled_csv = out / "train.csv"
    with open(labelled_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows([str(p), lab] for p, lab in rows)
    cfg = dataclasses.replace(base, workspace=out, data=dataclasses.replace(
        base.data, labelled=labelled_csv, pool=None, validation=None))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    print(api.pretrain_representation(cfg, progress=True), flush=True)
    t_pre = time.perf_counter() - t0
    k = len(cfg.classes)
    m = cfg.model
    paths = [p for p, _ in rows]
    y_all = np.array([cfg.classes.index(lab) for _, lab in rows])
    x, kept, _ = load_all(paths, channels=m.channels, size=m.image_size,
                          window=cfg.image.window, frame=cfg.image.frame)
    y = y_all[kept]
    test = list(scan_source(images / "test", cfg.classes))
    x_test, kept_t, _ = load_all([e.path for e in test], channels=m.channels, size=m.image_size,
                                 window=cfg.image.window, frame=cfg.image.frame)
    y_test = np.array([cfg.classes.index(e.label) for e in test])[kept_t]
    cache = sorted((out / "cache" / "representation").glob("*.pt"), key=lambda p: p.stat().st_mtime)

    def model() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        net = build_model(cfg)
        if not load_cached(cache[-1], net.backbone):
            raise SystemExit(f"cannot load the pretrained backbone {cache[-1]}")
        return net

    feats = backbone_features(model(), x, torch.device("cpu")).numpy()

    def probe(idx: np.ndarray, seed: int) -> float:
        net = model()
        fit_probe(net, x[idx], y[idx], cfg, device=torch.device("cpu"), seed=seed,
                  progress=False)
        return auroc(net, x_test, y_test, k)

    table: dict[str, list[float]] = {f"typiclust {a.first}": [], f"random {a.first}": [],
                                     f"random {2 * a.first}": []}
    t1 = time.perf_counter()
    for seed in seeds:
        rng = np.random.default_rng(seed * 1000 + 1)  # as medal query seeds round 1
        table[f"typiclust {a.first}"].append(
            probe(acquisition.typiclust(feats, a.first, rng=rng), seed))
        draw = np.random.default_rng(seed)
        table[f"random {a.first}"].append(probe(draw.choice(len(y), a.first, replace=False), seed))
        table[f"random {2 * a.first}"].append(
            probe(draw.choice(len(y), 2 * a.first, replace=False), seed))
    ceiling = probe(np.arange(len(y)), 0)
    t_eval = time.perf_counter() - t1

    print(f"\n{a.dataset}: {len(y)} train images (labels hidden), {len(y_test)} test images; "
          f"test AUROC of the frozen-backbone linear head")
    print(f"{'start':<14}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>9}")
    for name, vals in table.items():
        print(f"{name:<14}" + "".join(f"{v:9.3f}" for v in vals) + f"{np.mean(vals):9.3f}")
    d = np.array(table[f"typiclust {a.first}"]) - np.array(table[f"random {2 * a.first}"])
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else \
        float("nan")
    print(f"typiclust {a.first} minus random {2 * a.first}: {d.mean():+.3f} "
          f"[{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] (95% t interval over "
          f"{len(d)} seeds)")
    print(f"full-label ceiling (all {len(y)} train labels): {ceiling:.3f}")
    print(f"wall time: pretraining or cache load {t_pre:.0f} s, evaluation {t_eval:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
