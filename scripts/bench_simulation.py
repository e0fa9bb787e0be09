#!/usr/bin/env python3
"""Label-efficiency benchmark of `medal simulate` on a bundled dataset, honest protocol.

The fully labelled set is the dataset's whole official train split (the prepared labelled start
folder plus the pool with its hidden labels from pool_truth.csv); test is the official test
split. As a team meets it: a start of 20 labels drawn at random, no labelled validation set,
every label given counted (held-out ones included), 10 labels per round, 8 rounds (100 labels),
MC dropout T = 20, seeds 0-4, strategies random and bald, the config's defaults (a frozen
self-supervised backbone, pretrained once per seed, and a linear dropout head), two worker
processes with one torch thread each.

Then, in one table: per seed, each strategy's test AUROC at the end and area under the learning
curve; each strategy's paired difference to random (95% t interval over seeds); the zero-label
start (TypiClust's first 20 against random 20 and 40) and the full-label ceiling of medal's
training (scripts/bench_representation.py: with every label, the head's choice and the
companion); and, with --baseline, the comparison with another simulation (e.g. whole-network
training: run this script with --whole-network --rounds 20 --strategies random first).

    python scripts/bench_simulation.py                         # PneumoniaMNIST, ~40 min
    python scripts/bench_simulation.py --dataset retinamnist
    python scripts/bench_simulation.py --whole-network --rounds 20 --strategies random \\
        --out runs/bench-whole-network
    python scripts/bench_simulation.py --baseline runs/bench-whole-network/results.csv:random

Results, curves and summary.md go to runs/bench-simulation-<dataset>/ (resumable; --fresh
starts over).

Data: MedMNIST v2 (CC BY 4.0); see data/<dataset>/ATTRIBUTION.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from medal.benchmarks import label_efficiency_table, measure
from medal.benchmarks import report as representation_report
from medal.config import add_overrides_argument, load_config, parse_overrides
from medal.errors import DataError
from medal.medmnist import BUNDLED as DATASETS
from medal.medmnist import prepare_bundled
from medal.simulate import SimulationSettings, simulate

ROOT = Path(__file__).resolve().parents[1]

# Keys a user would pass as --set to `medal simulate`: no previews in a simulation.
OVERRIDES: dict[str, object] = {"device": "cpu", "labelling.previews": False}
# --whole-network: the defaults before 0.2 (whole network from random weights, 20 % hold-out
# to pick epochs), with fewer epochs at small label counts and when fine-tuning and validation
# every 5 epochs, which kept its trainings inside the time target.
WHOLE_NETWORK: dict[str, object] = {
    "representation.method": "none",
    "train.freeze_backbone": False,
    "model.hidden": 128,
    "train.validation_fraction": 0.2,
    "train.min_steps": 20,
    "train.fine_tune_epochs": 5,
    "train.validate_every": 5,
    "model.features": "last",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=DATASETS, default="pneumoniamnist")
    p.add_argument("--strategies", default="random,bald")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--budget", type=int, default=10)
    p.add_argument(
        "--start",
        default="random",
        help="random (default), class_balanced, class:<name> or a file list",
    )
    p.add_argument("--start-size", type=int, default=20)
    p.add_argument(
        "--validation",
        action="store_true",
        help="use the official validation split (not counted as labels) instead "
        "of holding out part of the labels given",
    )
    p.add_argument(
        "--whole-network",
        action="store_true",
        help="train the whole network from random weights (the defaults before 0.2)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="RESULTS.csv[+MORE.csv]:STRATEGY",
        help="compare every strategy with this simulation's strategy, seed by seed",
    )
    p.add_argument(
        "--backbones",
        choices=("per-seed", "shared"),
        default="per-seed",
        help="per-seed (default): one self-supervised pretraining per seed, so the "
        "intervals include its variation; shared: one for all (5x less "
        "pretraining)",
    )
    p.add_argument(
        "--no-representation",
        action="store_true",
        help="skip the zero-label start and full-label ceiling measurement",
    )
    p.add_argument("--mc-samples", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    add_overrides_argument(p, "extra config overrides (TOML values), e.g. train.probe_steps=500")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/bench-simulation-<dataset>)",
    )
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-round lines")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        images = prepare_bundled(ROOT / "data", a.dataset)
    except DataError as e:
        sys.exit(f"error: {e}")
    out = (a.out or ROOT / "runs" / f"bench-simulation-{a.dataset}").resolve()
    if a.fresh and out.exists():
        shutil.rmtree(out)
    overrides = {
        **OVERRIDES,
        **(WHOLE_NETWORK if a.whole_network else {}),
        "query.mc_samples": a.mc_samples,
        **parse_overrides(a.overrides),
    }
    cfg = load_config(ROOT / "configs" / f"{a.dataset}.toml", overrides)
    strategies = [s for s in a.strategies.split(",") if s]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    settings = SimulationSettings(
        truth=(images / "pool_truth.csv", images / "labelled"),
        out=out,
        strategies=tuple(strategies),
        seeds=tuple(seeds),
        rounds=a.rounds,
        budget=a.budget,
        start=a.start,
        start_size=a.start_size,
        validation="config" if a.validation else "none",
        workers=a.workers,
        threads=a.threads,
        verbose=not a.quiet,
        backbones=a.backbones,
    )
    t0 = time.perf_counter()
    r = simulate(cfg, settings)
    wall = time.perf_counter() - t0
    print()
    print(r.summary)
    rep = None
    if cfg.representation.method != "none" and not a.no_representation:
        ws = out / "representation"
        ws.mkdir(exist_ok=True)
        if not (ws / "cache").exists():  # the simulation's cache holds the same backbone
            (ws / "cache").symlink_to(out / "cache", target_is_directory=True)
        rep = measure(
            a.dataset,
            seeds,
            root=ROOT,
            overrides=parse_overrides(a.overrides),
            out=ws,
            progress=not a.quiet,
            backbones=a.backbones,
        )
    print(
        f"\n=== {a.dataset}: label efficiency, honest protocol (test AUROC"
        f"{', macro' if len(cfg.classes) > 2 else ''}) ==="
    )
    if r.rows:
        print(label_efficiency_table(out / "results.csv", strategies, a.baseline))
    if rep is not None:
        print(representation_report(rep))
    if r.rows:
        train = sum(float(x["train_seconds"]) for x in r.rows)
        rounds = sum(float(x["round_seconds"]) for x in r.rows if x.get("round_seconds"))
        print(
            f"{len(r.rows)} model rounds; summed over runs: training {train:.0f} s, "
            f"whole rounds {rounds:.0f} s"
        )
    print(f"config overrides: {overrides}")
    print(
        f"wall time: simulation {wall:.0f} s ({wall / 60:.1f} min) with {a.workers} "
        f"worker(s) x {a.threads} thread(s), including the one-off pretraining"
        + (
            f"; representation measurement {rep.seconds_pretrain + rep.seconds_eval:.0f} s"
            if rep
            else ""
        )
        + f"; results in {r.out}"
    )
    if r.failures:
        print(f"failed runs: {r.failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
