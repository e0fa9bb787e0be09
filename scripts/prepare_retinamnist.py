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

from medal.errors import DataError
from medal.medmnist import RETINAMNIST_CLASSES as CLASSES
from medal.medmnist import prepare_retinamnist

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT / "data" / "retinamnist" / "retinamnist.npz"


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
    try:
        prepare_retinamnist(NPZ, a.out, labelled=a.labelled, seed=a.seed, force=a.force)
    except DataError as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
