#!/usr/bin/env python3
"""The main job end to end on the bundled PneumoniaMNIST chest X-rays.

prepare folders -> medal train -> medal query -> a simulated radiologist fills labels.csv from
the hidden ground truth -> medal ingest -> medal round (fine-tune + query) -> ... -> medal status.
Every step runs the same `medal` commands a user types (in-process), on PNG and DICOM files.
The demo uses its own workspace (runs/demo by default), rebuilt on every run.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

from medal import api
from medal.cli import main as medal
from medal.config import load_config
from medal.errors import DataError
from medal.medmnist import prepare_bundled
from medal.roundfolder import MANIFEST, labels_files, manifest_sources, write_labels

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "pneumoniamnist.toml"
DATA = ROOT / "data" / "pneumoniamnist" / "images"


def radiologist(folder: Path, truth: dict[str, str]) -> int:
    """Fill labels.csv the way a radiologist would, from the hidden labels of the sources."""
    source = manifest_sources(folder / MANIFEST)
    answers = [(f, truth[str(Path(source[f]).resolve())]) for f in labels_files(folder)]
    write_labels(folder, answers)
    return len(answers)


def run(cmd: list[str]) -> None:
    print(f"\n$ medal {' '.join(cmd)}", flush=True)
    code = medal(cmd)
    if code != 0:
        sys.exit(f"demo: 'medal {' '.join(cmd)}' failed with exit code {code}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3, help="labelling rounds (default 3)")
    p.add_argument("--workspace", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--strategy", default="bald")
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=5,
        help="self-supervised pretraining epochs (default 5, so the demo takes "
        "minutes; the config's default is 30)",
    )
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        prepare_bundled(ROOT / "data", "pneumoniamnist")  # into DATA
    except DataError as e:
        sys.exit(f"error: {e}")
    with open(DATA / "pool_truth.csv", newline="") as f:
        truth = {str((DATA / r["file"]).resolve()): r["label"] for r in csv.DictReader(f)}
    if a.workspace.exists():
        shutil.rmtree(a.workspace)
    common = [
        "-c",
        str(CONFIG.relative_to(Path.cwd()) if CONFIG.is_relative_to(Path.cwd()) else CONFIG),
        "--set",
        f'workspace="{a.workspace.resolve()}"',
        "--set",
        f'query.strategy="{a.strategy}"',
        "--set",
        f"representation.epochs={a.pretrain_epochs}",
        "-q",
    ]
    run(["train", *common])
    run(["query", *common])
    for r in range(1, a.rounds + 1):
        folder = a.workspace / "labelling" / f"round-{r:03d}"
        n = radiologist(folder, truth)
        print(f"\n[simulated radiologist labelled {n} images in {folder / 'labels.csv'}]")
        run(["ingest", *common, str(folder)])
        run(["round", *common] if r < a.rounds else ["train", *common])
    run(["status", *common])
    cfg = load_config(
        CONFIG,
        {"workspace": str(a.workspace.resolve()), "representation.epochs": a.pretrain_epochs},
    )
    s = api.status(cfg)
    print("\ntest metrics per round (MC-averaged probabilities):")
    print("round  labels  test images  accuracy  AUROC")
    for m in s.models:
        t = s.metrics[m["round"]]["test"]
        print(
            f"{m['round']:>5}  {m['n_labels']:>6}  {int(t['n']):>11}  {t['accuracy']:>8.3f}"
            f"  {t['auroc']:>5.3f}"
        )
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
