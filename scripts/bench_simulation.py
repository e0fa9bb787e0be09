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
start (TypiClust's first 20 against random 20 and 40) and the full-label ceiling of the same
head (scripts/bench_representation.py); and, with --baseline, the comparison with another
simulation (e.g. whole-network training: run this script with --whole-network --rounds 20
--strategies random first).

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_representation import DATASETS, measure, prepare_dataset  # noqa: E402
from bench_representation import report as representation_report  # noqa: E402
from compare_simulations import area, curves, interval  # noqa: E402

from medal.config import load_config, parse_overrides  # noqa: E402
from medal.simulate import SimulationSettings, simulate  # noqa: E402

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
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides (TOML values), e.g. train.probe_steps=500",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/bench-simulation-<dataset>)",
    )
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-round lines")
    return p


def one_table(results_csv: Path, strategies: list[str], baseline: str | None) -> str:
    """Per seed: each strategy's final test AUROC / area; paired differences to random (and to
    ``baseline``) with 95% t intervals."""
    cs = {s: curves(f"{results_csv}:{s}", "auroc") for s in strategies}
    seeds = sorted(set.intersection(*(set(c) for c in cs.values())))
    lo = max(c[s][0][0] for c in cs.values() for s in seeds)
    hi = min(c[s][0][-1] for c in cs.values() for s in seeds)
    head = f"{'':<34}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>9}"
    lines = [head]

    def row(name: str, vals: list[float], fmt: str = "9.3f") -> None:
        lines.append(f"{name:<34}" + "".join(f"{v:{fmt}}" for v in vals) + f"{np.mean(vals):{fmt}}")

    for s, c in cs.items():
        row(f"{s}: AUROC at {int(c[seeds[0]][0][-1])} labels", [c[k][1][-1] for k in seeds])
        row(f"{s}: area {lo:.0f}-{hi:.0f} labels", [area(*c[k], lo, hi) for k in seeds], "9.4f")
    if "random" in cs:
        for s in cs:
            if s == "random":
                continue
            d = np.array([area(*cs[s][k], lo, hi) - area(*cs["random"][k], lo, hi) for k in seeds])
            m, a, b = interval(d)
            row(f"{s} - random: area", list(d), "+9.4f")
            lines.append(f"{'':<34}mean {m:+.4f}, 95% interval [{a:+.4f}, {b:+.4f}]")
    if baseline:
        base = curves(baseline, "auroc")
        common = [k for k in seeds if k in base]
        if common:
            target = float(np.mean([base[k][1][-1] for k in common]))
            at = int(np.median([base[k][0][-1] for k in common]))
            row(f"baseline: AUROC at {at} labels", [base[k][1][-1] for k in common])
            for s, c in cs.items():
                reach = []
                for k in common:
                    hit = c[k][0][c[k][1] >= target]
                    reach.append(float(hit[0]) if len(hit) else float("nan"))
                row(f"{s}: labels to reach {target:.3f}", reach, "9.0f")
                blo, bhi = max(lo, min(base[k][0][0] for k in common)), hi
                d = np.array([area(*c[k], blo, bhi) - area(*base[k], blo, bhi) for k in common])
                m, a, b = interval(d)
                row(f"{s} - baseline: area", list(d), "+9.4f")
                lines.append(
                    f"{'':<34}mean {m:+.4f}, 95% interval [{a:+.4f}, {b:+.4f}]; "
                    f"positive in {int((d > 0).sum())} of {len(d)}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    images = prepare_dataset(a.dataset)
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
        print(one_table(out / "results.csv", strategies, a.baseline))
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
