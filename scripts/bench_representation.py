#!/usr/bin/env python3
"""What the self-supervised representation buys, measured on a bundled dataset's official
train split (as the pool, labels hidden) and test split, with medal's own components:

1. the backbone is pretrained on the train images without labels (or loaded from the cache:
   ``api.pretrain_representation``, the step ``medal train``/``query`` run themselves);
2. zero-label start: TypiClust picks 20 images in that embedding, exactly as ``medal query``
   picks a project's first round, and the frozen-backbone head (``train.fit_probe``) trains on
   them; compared with 20 and 40 images drawn at random, per seed;
3. the full-label ceiling: medal's training on every train label (the probe, and with the
   labels covering every image the head's choice and the whole-network companion, as
   ``train.head_choice`` and ``train.companion`` say; ``medal.benchmarks.ceiling_model``).

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
import sys
from pathlib import Path

from medal.benchmarks import measure, report
from medal.config import add_overrides_argument, parse_overrides
from medal.errors import DataError
from medal.medmnist import BUNDLED as DATASETS

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=DATASETS, default="pneumoniamnist")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--first", type=int, default=20, help="size of the zero-label first round")
    add_overrides_argument(p, "extra config overrides (TOML values)")
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


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        r = measure(
            a.dataset,
            [int(s) for s in a.seeds.split(",")],
            root=ROOT,
            first=a.first,
            overrides=parse_overrides(a.overrides),
            out=a.out,
            backbones=a.backbones,
        )
    except DataError as e:
        sys.exit(f"error: {e}")
    print()
    print(report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
