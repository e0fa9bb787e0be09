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
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from medmnist_folders import (  # noqa: E402
    already_prepared,
    class_balanced_start,
    finish,
    load_verified,
    save_png,
    write_eval_splits,
    write_truth,
)

NPZ = ROOT / "data" / "retinamnist" / "retinamnist.npz"
SHA256 = "254915f5f0a2074665c4676356824cf4ef4a3bcab233894b4bafcaf48962bd69"
CLASSES = ("grade0", "grade1", "grade2", "grade3", "grade4")


def prepare(out: Path, *, labelled: int, seed: int, force: bool) -> Path:
    """Write the folders (once; a marker file records the settings). Returns ``out``."""
    settings = {"labelled": labelled, "seed": seed, "source_sha256": SHA256}
    if already_prepared(out, settings, force):
        return out
    d = load_verified(NPZ, SHA256, out)
    rng = np.random.default_rng(seed)
    x, y = d["train_images"], d["train_labels"].ravel()
    start = class_balanced_start(y, len(CLASSES), labelled, rng)
    for i in sorted(start):
        save_png(out / "labelled" / CLASSES[y[i]] / f"train_{i:05d}.png", x[i])
    pool = np.setdiff1d(np.arange(len(x)), start)
    truth = []
    for i in pool:
        rel = f"pool/train_{i:05d}.png"
        save_png(out / rel, x[i])
        truth.append((rel, CLASSES[y[i]]))
    write_truth(out, truth)
    write_eval_splits(out, d, CLASSES)
    finish(out, settings)
    print(
        f"prepared {out}: {len(start)} labelled, {len(pool)} pool, "
        f"{len(d['val_images'])} validation, {len(d['test_images'])} test"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "data" / "retinamnist" / "images")
    p.add_argument(
        "--labelled",
        type=int,
        default=25,
        help="size of the labelled start set, spread over the 5 grades (default 25)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    a = p.parse_args(argv)
    if a.labelled < len(CLASSES):
        p.error(f"--labelled must be at least {len(CLASSES)} (one image per grade)")
    prepare(a.out, labelled=a.labelled, seed=a.seed, force=a.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
