#!/usr/bin/env python3
"""Turn the bundled PneumoniaMNIST file into ordinary image folders, as a user's data would be.

Writes (under data/pneumoniamnist/images/ by default; source images are generated once)::

    labelled/normal/*.png  labelled/pneumonia/*.png   small labelled start set (--labelled)
    pool/png/*.png         pool/dicom/*.dcm           the rest of train, unlabelled; a share
                                                      (--dicom-fraction) written as DICOM
    validation/<class>/*.png                          the official val split
    test/<class>/*.png                                the official test split
    pool_truth.csv                                    hidden pool labels (for the demo's
                                                      simulated radiologist only)

Data: PneumoniaMNIST (MedMNIST v2, CC BY 4.0); see data/pneumoniamnist/ATTRIBUTION.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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

from medal.dicomwrite import write_dicom  # noqa: E402

NPZ = ROOT / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
SHA256 = "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8"
CLASSES = ("normal", "pneumonia")


def _dicom(path: Path, img: np.ndarray, index: int) -> None:
    # 12-bit stored values with a CT-like rescale and a window that maps them back onto 0..1,
    # so the demo exercises the modality LUT and VOI path and sees the same pixels as the PNGs.
    stored = img.astype(np.uint16) * 16
    write_dicom(
        path,
        stored,
        bits_stored=12,
        slope=1.0,
        intercept=-1024.0,
        window=(1016.5, 4081.0),
        patient_id=f"PNEUMOMNIST{index:05d}",
        uid_source=f"pneumoniamnist-train-{index:05d}",
    )


def prepare(out: Path, *, labelled: int, dicom_fraction: float, seed: int, force: bool) -> Path:
    settings = {
        "labelled": labelled,
        "dicom_fraction": dicom_fraction,
        "seed": seed,
        "source_sha256": SHA256,
    }
    if already_prepared(out, settings, force):
        return out
    d = load_verified(NPZ, SHA256, out)
    rng = np.random.default_rng(seed)
    x, y = d["train_images"], d["train_labels"].ravel()
    start = class_balanced_start(y, len(CLASSES), labelled, rng)
    for i in sorted(start):
        save_png(out / "labelled" / CLASSES[y[i]] / f"train_{i:05d}.png", x[i])
    pool = np.setdiff1d(np.arange(len(x)), start)
    as_dicom = set(rng.choice(pool, int(round(len(pool) * dicom_fraction)), replace=False))
    truth = []
    for i in pool:
        if i in as_dicom:
            rel = f"dicom/train_{i:05d}.dcm"
            _dicom(out / "pool" / rel, x[i], int(i))
        else:
            rel = f"png/train_{i:05d}.png"
            save_png(out / "pool" / rel, x[i])
        truth.append((f"pool/{rel}", CLASSES[y[i]]))
    write_truth(out, truth)
    write_eval_splits(out, d, CLASSES)
    finish(out, settings)
    print(
        f"prepared {out}: {len(start)} labelled, {len(pool)} pool "
        f"({len(as_dicom)} as DICOM), {len(d['val_images'])} validation, "
        f"{len(d['test_images'])} test"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "data" / "pneumoniamnist" / "images")
    p.add_argument(
        "--labelled",
        type=int,
        default=20,
        help="size of the labelled start set, half per class (default 20)",
    )
    p.add_argument(
        "--dicom-fraction",
        type=float,
        default=0.1,
        help="share of the pool written as DICOM instead of PNG (default 0.1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    a = p.parse_args(argv)
    prepare(a.out, labelled=a.labelled, dicom_fraction=a.dicom_fraction, seed=a.seed, force=a.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
