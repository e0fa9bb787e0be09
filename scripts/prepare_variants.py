"""Stress variants of the bundled MedMNIST sets, for checking defaults on more than two data sets.

Each variant is a folder with a pool of unlabelled PNGs, the pool's hidden labels
(``pool_truth.csv``), empty labelled class folders (the simulation draws a random start), the
official test split under the variant's classes, and a config with medal's defaults (only the
data paths, classes, channels and the 28-pixel image size are set):

* ``pn500``: PneumoniaMNIST's train split cut to 500 images (a small pool);
* ``pn1200``: cut to 1,200 images;
* ``pnimb4``: 1,200 images at 1 normal : 4 pneumonia (240 : 960; the official split is 1 : 2.9);
* ``pnimb9``: 1,200 images at 1 normal : 9 pneumonia (120 : 1,080; a rarer minority);
* ``retref``: RetinaMNIST's whole train split (1,080) as referable (grade 2-4) vs not (0-1);
* ``ret4``: the same 1,080 images as proliferative (grade 4, 66 images) vs the rest (1 : 15; a
  rare class from a second source).

Cuts are drawn once per variant with a fixed seed (the variant's definition), not per run.

    python scripts/prepare_variants.py --out runs/variants            # all six
    python scripts/prepare_variants.py --out runs/variants --only pn500
    medal simulate -c runs/variants/pn500/config.toml \
        --truth runs/variants/pn500/images/pool_truth.csv --strategies random,bald ...

Data: MedMNIST v2 (CC BY 4.0); see data/<dataset>/ATTRIBUTION.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medal.errors import DataError
from medal.medmnist import SHA256, read_verified, save_png

ROOT = Path(__file__).resolve().parents[1]
CUT_SEED = 20261206


@dataclass(frozen=True)
class Variant:
    dataset: str
    classes: tuple[str, ...]
    grade_to_class: tuple[int, ...]  # official label -> index into classes
    pool: int = 0  # 0: the whole train split
    per_class: tuple[int, ...] = ()  # exact counts per class (overrides pool)
    channels: int = 1


VARIANTS: dict[str, Variant] = {
    "pn500": Variant("pneumoniamnist", ("normal", "pneumonia"), (0, 1), pool=500),
    "pn1200": Variant("pneumoniamnist", ("normal", "pneumonia"), (0, 1), pool=1200),
    "pnimb4": Variant("pneumoniamnist", ("normal", "pneumonia"), (0, 1), per_class=(240, 960)),
    "pnimb9": Variant("pneumoniamnist", ("normal", "pneumonia"), (0, 1), per_class=(120, 1080)),
    "retref": Variant(
        "retinamnist", ("nonreferable", "referable"), (0, 0, 1, 1, 1), pool=0, channels=3
    ),
    "ret4": Variant("retinamnist", ("other", "proliferative"), (0, 0, 0, 0, 1), channels=3),
}


def _choose(v: Variant, y: np.ndarray) -> np.ndarray:
    """Indices into the train split, sorted, drawn with the variant's fixed seed."""
    rng = np.random.default_rng(CUT_SEED)
    if v.per_class:
        parts = [
            rng.choice(np.flatnonzero(y == c), size=n, replace=False)
            for c, n in enumerate(v.per_class)
        ]
        return np.sort(np.concatenate(parts))
    if v.pool:
        return np.sort(rng.choice(len(y), size=v.pool, replace=False))
    return np.arange(len(y))


def _config(v: Variant, name: str) -> str:
    classes = ", ".join(f'"{c}"' for c in v.classes)
    return (
        f"# stress variant {name} (scripts/prepare_variants.py): medal's defaults\n"
        f'workspace = "../ws-{name}"\n'
        f"classes = [{classes}]\n"
        "seed = 0\n\n[data]\n"
        'labelled = "images/labelled"\npool = "images/pool"\ntest = "images/test"\n\n'
        f"[model]\nimage_size = 28\nchannels = {v.channels}\n"
    )


def prepare(name: str, out: Path) -> Path:
    """Write variant ``name`` into ``out/name`` (replacing it) and return that folder."""
    v = VARIANTS[name]
    npz = read_verified(ROOT / "data" / v.dataset / f"{v.dataset}.npz", SHA256[v.dataset])
    mapping = np.asarray(v.grade_to_class)
    y_train = mapping[npz["train_labels"].ravel()]
    y_test = mapping[npz["test_labels"].ravel()]
    keep = _choose(v, y_train)
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    images = folder / "images"
    for c in v.classes:
        (images / "labelled" / c).mkdir(parents=True)
        (images / "test" / c).mkdir(parents=True)
    (images / "pool").mkdir()
    with open(images / "pool_truth.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for i in keep:
            rel = f"pool/train_{i:05d}.png"
            save_png(images / rel, npz["train_images"][i])
            w.writerow([rel, v.classes[y_train[i]]])
    for i, c in enumerate(y_test):
        save_png(images / "test" / v.classes[c] / f"test_{i:05d}.png", npz["test_images"][i])
    (folder / "config.toml").write_text(_config(v, name), encoding="utf-8")
    counts = {v.classes[c]: int((y_train[keep] == c).sum()) for c in range(len(v.classes))}
    (folder / "variant.json").write_text(
        json.dumps({"name": name, "dataset": v.dataset, "pool": counts, "cut_seed": CUT_SEED}),
        encoding="utf-8",
    )
    print(f"{name}: pool {len(keep)} {counts}, test {len(y_test)} -> {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the variants")
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variant names")
    a = p.parse_args(argv)
    for name in [n for n in a.only.split(",") if n]:
        if name not in VARIANTS:
            p.error(f"--only: unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        try:
            prepare(name, a.out.resolve())
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
