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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compare_simulations import interval  # noqa: E402

from medal import acquisition, api  # noqa: E402
from medal.config import load_config, parse_overrides  # noqa: E402
from medal.data import load_all  # noqa: E402
from medal.scan import scan_source  # noqa: E402
from medal.metrics import classification_metrics  # noqa: E402
from medal.train import backbone_features, fit_probe, predict_deterministic  # noqa: E402

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
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=DATASETS, default="pneumoniamnist")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--first", type=int, default=20, help="size of the zero-label first round")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides (TOML values)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="workspace (default runs/bench-representation-<dataset>)",
    )
    p.add_argument(
        "--backbones",
        choices=("per-seed", "shared"),
        default="per-seed",
        help="one pretrained backbone per seed (default) or one for all seeds",
    )
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
    return classification_metrics(
        y_test, predict_deterministic(model, x_test, torch.device("cpu")), k
    )["auroc"]


@dataclass
class Measured:
    """Test AUROC per start and seed, the full-label ceiling, and the seconds spent."""

    dataset: str
    seeds: list[int]
    table: dict[str, list[float]]
    ceiling: list[float]
    """Per seed's backbone (one value when the seeds share one)."""
    n_train: int
    n_test: int
    seconds_pretrain: float
    seconds_eval: float

    def diff(self, a: str, b: str) -> tuple[float, float, float]:
        """Mean paired difference ``a - b`` over seeds with its 95% t interval."""
        return interval(np.array(self.table[a]) - np.array(self.table[b]))


def measure(
    dataset: str,
    seeds: list[int],
    *,
    first: int = 20,
    overrides: dict[str, object] | None = None,
    out: Path | None = None,
    progress: bool = True,
    backbones: str = "per-seed",
) -> Measured:
    """Pretrain (or load) the backbone for ``dataset``'s train split and measure the zero-label
    start and the full-label ceiling of the frozen-backbone head, per seed. ``backbones``:
    ``per-seed`` pretrains one backbone per seed (``representation.seed`` = the seed, as
    ``medal simulate --backbones per-seed`` does), ``shared`` one with the config's seed."""
    images = prepare_dataset(dataset)
    out = (out or ROOT / "runs" / f"bench-representation-{dataset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    over = {**PROBE, **(overrides or {})}
    base = load_config(ROOT / "configs" / f"{dataset}.toml", over)
    rows = truth(images, base.classes)
    labelled_csv = out / "train.csv"
    with open(labelled_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows([str(p), lab] for p, lab in rows)
    cfg = dataclasses.replace(
        base,
        workspace=out,
        data=dataclasses.replace(base.data, labelled=labelled_csv, pool=None, validation=None),
    )
    t0 = time.perf_counter()
    backbone: dict[int, Path] = {}
    for seed in seeds if backbones == "per-seed" else [api.representation_seed(cfg)]:
        line, backbone[seed] = api.ensure_backbone(
            dataclasses.replace(
                cfg, representation=dataclasses.replace(cfg.representation, seed=seed)
            ),
            progress=progress,
        )
        if progress:
            print(f"backbone seed {seed}: {line}", flush=True)
    t_pre = time.perf_counter() - t0
    k = len(cfg.classes)
    m = cfg.model
    paths = [p for p, _ in rows]
    y_all = np.array([cfg.classes.index(lab) for _, lab in rows])
    x, kept, _ = load_all(
        paths,
        channels=m.channels,
        size=m.image_size,
        window=cfg.image.window,
        frame=cfg.image.frame,
    )
    y = y_all[kept]
    test = list(scan_source(images / "test", cfg.classes))
    x_test, kept_t, _ = load_all(
        [e.path for e in test],
        channels=m.channels,
        size=m.image_size,
        window=cfg.image.window,
        frame=cfg.image.frame,
    )
    y_test = np.array([cfg.classes.index(e.label) for e in test])[kept_t]

    def probe(path: Path, idx: np.ndarray, seed: int) -> float:
        net = api.start_model(cfg, None, backbone=path)
        fit_probe(net, x[idx], y[idx], cfg, device=torch.device("cpu"), seed=seed, progress=False)
        return auroc(net, x_test, y_test, k)

    table: dict[str, list[float]] = {
        f"typiclust {first}": [],
        f"random {first}": [],
        f"random {2 * first}": [],
    }
    t1 = time.perf_counter()
    feats: dict[Path, np.ndarray] = {}
    for seed in seeds:
        path = backbone.get(seed) or next(iter(backbone.values()))
        if path not in feats:
            feats[path] = backbone_features(
                api.start_model(cfg, None, backbone=path), x, torch.device("cpu")
            ).numpy()
        rng = np.random.default_rng(seed * 1000 + 1)  # as medal query seeds round 1
        table[f"typiclust {first}"].append(
            probe(path, acquisition.typiclust(feats[path], first, rng=rng), seed)
        )
        draw = np.random.default_rng(seed)
        table[f"random {first}"].append(
            probe(path, draw.choice(len(y), first, replace=False), seed)
        )
        table[f"random {2 * first}"].append(
            probe(path, draw.choice(len(y), 2 * first, replace=False), seed)
        )
    ceiling = [probe(path, np.arange(len(y)), 0) for path in backbone.values()]
    return Measured(
        dataset, seeds, table, ceiling, len(y), len(y_test), t_pre, time.perf_counter() - t1
    )


def report(r: Measured) -> str:
    first = next(iter(r.table)).split()[-1]
    lines = [
        f"{r.dataset}: {r.n_train} train images (labels hidden), {r.n_test} test images; "
        f"test AUROC of the frozen-backbone linear head",
        f"{'start':<14}" + "".join(f"{'seed ' + str(s):>9}" for s in r.seeds) + f"{'mean':>9}",
    ]
    for name, vals in r.table.items():
        lines.append(f"{name:<14}" + "".join(f"{v:9.3f}" for v in vals) + f"{np.mean(vals):9.3f}")
    m, lo, hi = r.diff(f"typiclust {first}", f"random {2 * int(first)}")
    lines.append(
        f"typiclust {first} minus random {2 * int(first)}: {m:+.3f} [{lo:+.3f}, "
        f"{hi:+.3f}] (95% t interval over {len(r.seeds)} seeds)"
    )
    each = (
        f" (per seed's backbone: {', '.join(f'{c:.3f}' for c in r.ceiling)})"
        if len(r.ceiling) > 1
        else ""
    )
    lines.append(
        f"full-label ceiling (all {r.n_train} train labels): {np.mean(r.ceiling):.3f}{each}"
    )
    lines.append(
        f"wall time: pretraining or cache load {r.seconds_pretrain:.0f} s, "
        f"evaluation {r.seconds_eval:.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    r = measure(
        a.dataset,
        [int(s) for s in a.seeds.split(",")],
        first=a.first,
        overrides=parse_overrides(a.overrides),
        out=a.out,
        backbones=a.backbones,
    )
    print()
    print(report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
