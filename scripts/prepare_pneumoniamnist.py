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

from medal.errors import DataError
from medal.medmnist import prepare_pneumoniamnist

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT / "data" / "pneumoniamnist" / "pneumoniamnist.npz"


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
    try:
        prepare_pneumoniamnist(
            NPZ,
            a.out,
            labelled=a.labelled,
            dicom_fraction=a.dicom_fraction,
            seed=a.seed,
            force=a.force,
        )
    except DataError as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
