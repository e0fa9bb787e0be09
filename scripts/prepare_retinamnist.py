#!/usr/bin/env python3
"""Turn the bundled RetinaMNIST file into ordinary image folders, as a user's data would be.

Writes (under data/retinamnist/images/ by default)::

    labelled/grade0/*.png ... labelled/grade4/*.png   small labelled start set (--labelled,
                                                      spread evenly over the five grades)
    pool/*.png                                        the rest of train, unlabelled
    validation/<class>/*.png                          the official val split
    test/<class>/*.png                                the official test split
    pool_truth.csv                                    hidden pool labels (for simulations only)

The images are 28x28 RGB fundus photographs (PNG, 8-bit RGB); the classes are the diabetic
retinopathy grades 0 (none) to 4 (proliferative), used as five unordered classes.

Data: RetinaMNIST (MedMNIST v2, CC BY 4.0; source DeepDRiD); see data/retinamnist/ATTRIBUTION.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT / "data" / "retinamnist" / "retinamnist.npz"
SHA256 = "254915f5f0a2074665c4676356824cf4ef4a3bcab233894b4bafcaf48962bd69"
CLASSES = ("grade0", "grade1", "grade2", "grade3", "grade4")


def _png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="RGB").save(path)


def prepare(out: Path, *, labelled: int, seed: int, force: bool) -> Path:
    """Write the folders (once; a marker file records the settings). Returns ``out``."""
    settings = {"labelled": labelled, "seed": seed, "source_sha256": SHA256}
    marker = out / "prepared.json"
    if marker.is_file() and not force:
        if json.loads(marker.read_text()) == settings:
            print(f"{out} is already prepared (use --force to rebuild)")
            return out
        sys.exit(f"error: {out} was prepared with other settings; use --force to rebuild it")
    digest = hashlib.sha256(NPZ.read_bytes()).hexdigest()
    if digest != SHA256:
        sys.exit(f"error: {NPZ} has sha256 {digest}, expected {SHA256}")
    if out.exists():
        shutil.rmtree(out)
    d = np.load(NPZ)
    rng = np.random.default_rng(seed)
    x, y = d["train_images"], d["train_labels"].ravel()
    per_class = [labelled // len(CLASSES) + (c < labelled % len(CLASSES))
                 for c in range(len(CLASSES))]
    start = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                            for c, k in enumerate(per_class)])
    for i in sorted(start):
        _png(out / "labelled" / CLASSES[y[i]] / f"train_{i:05d}.png", x[i])
    pool = np.setdiff1d(np.arange(len(x)), start)
    truth = []
    for i in pool:
        rel = f"pool/train_{i:05d}.png"
        _png(out / rel, x[i])
        truth.append((rel, CLASSES[y[i]]))
    with open(out / "pool_truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows(truth)
    for split, folder in (("val", "validation"), ("test", "test")):
        xs, ys = d[f"{split}_images"], d[f"{split}_labels"].ravel()
        for i in range(len(xs)):
            _png(out / folder / CLASSES[ys[i]] / f"{split}_{i:05d}.png", xs[i])
    marker.write_text(json.dumps(settings))
    print(f"prepared {out}: {len(start)} labelled, {len(pool)} pool, "
          f"{len(d['val_images'])} validation, {len(d['test_images'])} test")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "data" / "retinamnist" / "images")
    p.add_argument("--labelled", type=int, default=25,
                   help="size of the labelled start set, spread over the 5 grades (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    a = p.parse_args(argv)
    if a.labelled < len(CLASSES):
        p.error(f"--labelled must be at least {len(CLASSES)} (one image per grade)")
    prepare(a.out, labelled=a.labelled, seed=a.seed, force=a.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
