#!/usr/bin/env python3
"""Compare a simulation against a baseline simulation, seed by seed (the done-when of the
label-efficiency work): how many labels the candidate needs to reach the AUROC the baseline
reaches at its last label count, and the paired difference in area under the learning curve
over the label range both cover.

    python scripts/compare_simulations.py BASELINE.csv:random CANDIDATE.csv:bald [--metric auroc]

Each argument is a results.csv written by `medal simulate` (or scripts/bench_simulation.py),
a colon and the strategy to take from it; several baseline files may be joined with "+"
(e.g. two simulations that ran different seeds). Labels are the labels given (held-out
validation labels included), as in results.csv. Only seeds present in both are compared.

Pooled over several data sets (the issue-25 criterion: one interval over every paired run):

    python scripts/compare_simulations.py --pool random:bald A/results.csv B/results.csv ...

gives, per file, the paired area differences candidate - baseline per seed (both strategies
from that file; "+" joins files as above) and then one 95 % t interval over all of them. An
argument BASE.csv=CAND.csv takes the baseline from the first file and the candidate from the
second (two simulations of one data set, e.g. whole-network training against the defaults).

--level sets the intervals' confidence (default 0.95), e.g. 0.983 for three candidates judged
against one baseline with Bonferroni's correction (0.05 / 3).

--common reads both curves of a pair only at the label counts both have, so simulations with
other round sizes compare on one grid (rounds of 10 against rounds of 50: 20, 70, ..., 520):

    python scripts/compare_simulations.py --pool bald:bald --common R50/results.csv=R10/results.csv
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from medal.simulate import curve_area, read_curves, t_interval_or_nan


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="BASELINE.csv:strategy CANDIDATE.csv:strategy, or with --pool: results.csv files "
        "(or BASE.csv=CAND.csv pairs)",
    )
    p.add_argument("--metric", default="auroc")
    p.add_argument(
        "--pool",
        metavar="BASELINE:CANDIDATE",
        default=None,
        help="strategies to pair within each file, pooled over all files (e.g. random:bald)",
    )
    p.add_argument(
        "--common",
        action="store_true",
        help="integrate each pair's curves only at the label counts both have",
    )
    p.add_argument(
        "--level",
        type=float,
        default=0.95,
        help="confidence of the t intervals, in (0, 1) (default 0.95)",
    )
    return p


Curve = tuple[np.ndarray, np.ndarray]
"""A seed's learning curve: label counts ``[P]`` and the metric ``[P]``."""


def on_common_labels(a: Curve, b: Curve) -> tuple[Curve, Curve]:
    """Both curves at only the label counts both have."""
    both = np.intersect1d(a[0], b[0])
    return (both, a[1][np.isin(a[0], both)]), (both, b[1][np.isin(b[0], both)])


def paired_areas(
    base: dict[int, Curve], cand: dict[int, Curve], common: bool = False
) -> tuple[list[int], float, float, list[tuple[float, float]]]:
    """Seeds in both, the label range both cover ``(lo, hi)``, and per seed the areas
    ``(baseline, candidate)`` of the test metric over that range (``common``: of the curves
    at the label counts both have, :func:`on_common_labels`)."""
    seeds = sorted(set(base) & set(cand))
    if not seeds:
        return [], math.nan, math.nan, []
    if common:
        pairs = {s: on_common_labels(base[s], cand[s]) for s in seeds}
        base, cand = {s: p[0] for s, p in pairs.items()}, {s: p[1] for s, p in pairs.items()}
    lo = max(max(base[s][0][0], cand[s][0][0]) for s in seeds)
    hi = min(min(base[s][0][-1], cand[s][0][-1]) for s in seeds)
    return (
        seeds,
        lo,
        hi,
        [(curve_area(*base[s], lo, hi), curve_area(*cand[s], lo, hi)) for s in seeds],
    )


def pooled(
    spec: str, files: list[str], metric: str, level: float = 0.95, common: bool = False
) -> int:
    """Print per file and pooled paired area differences; 1 if a file pairs no seed."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise SystemExit(f"--pool: expected BASELINE:CANDIDATE (e.g. random:bald), got {spec!r}")
    b, c = spec.split(":")
    every: list[float] = []
    for f in files:
        fb, _, fc = f.partition("=")
        seeds, lo, hi, areas = paired_areas(
            read_curves(f"{fb}:{b}", metric), read_curves(f"{fc or fb}:{c}", metric), common
        )
        if not seeds:
            print(f"{f}: no seed has both {b} and {c}")
            return 1
        d = [ac - ab for ab, ac in areas]
        every += d
        m, low, high = t_interval_or_nan(np.array(d), level)
        print(
            f"{f} ({lo:.0f}-{hi:.0f} labels, seeds {seeds}): {c} - {b} area "
            f"{m:+.4f} [{low:+.4f}, {high:+.4f}]; per seed " + ", ".join(f"{x:+.4f}" for x in d)
        )
    m, low, high = t_interval_or_nan(np.array(every), level)
    print(
        f"pooled {c} - {b} area over {len(every)} paired runs: {m:+.4f} [{low:+.4f}, "
        f"{high:+.4f}] ({_pct(level)} t interval); positive in {sum(x > 0 for x in every)} "
        f"of {len(every)}"
    )
    return 0


def compare(
    baseline: str, candidate: str, metric: str, level: float = 0.95, common: bool = False
) -> int:
    """The two-simulation comparison of the module docstring, printed."""
    base, cand = read_curves(baseline, metric), read_curves(candidate, metric)
    seeds, lo, hi, areas = paired_areas(base, cand, common)
    if not seeds:
        raise SystemExit("no seed is in both")
    target = float(np.mean([base[s][1][-1] for s in seeds]))
    at = int(np.median([base[s][0][-1] for s in seeds]))
    print(
        f"baseline {baseline}: mean test {metric} at its last point ({at} labels) "
        f"over seeds {seeds}: {target:.3f}"
    )
    print(
        f"{'seed':>4} {'baseline last':>14} {'candidate last':>15} {'labels to reach':>16} "
        f"{'area base':>10} {'area cand':>10} {'diff':>7}   (area over {lo:.0f}-{hi:.0f} labels)"
    )
    diffs, reach = [], []
    for s, (ab, ac) in zip(seeds, areas, strict=True):
        bx, by = base[s]
        cx, cy = cand[s]
        hit = cx[cy >= target]
        reach.append(float(hit[0]) if len(hit) else float("nan"))
        diffs.append(ac - ab)
        print(
            f"{s:>4} {by[-1]:>9.3f}@{bx[-1]:<4.0f} {cy[-1]:>10.3f}@{cx[-1]:<4.0f} "
            f"{'never' if math.isnan(reach[-1]) else f'{reach[-1]:.0f}':>16} {ab:>10.4f} "
            f"{ac:>10.4f} {ac - ab:>+7.4f}"
        )
    m, low, high = t_interval_or_nan(np.array(diffs), level)
    done = [r for r in reach if not math.isnan(r)]
    print(
        f"candidate reaches {target:.3f} in {len(done)} of {len(seeds)} seeds"
        + (f" (mean {np.mean(done):.0f} labels over those)" if done else "")
    )
    print(
        f"area difference candidate - baseline: {m:+.4f} [{low:+.4f}, {high:+.4f}] "
        f"({_pct(level)} t interval over {len(seeds)} seeds); positive in "
        f"{sum(d > 0 for d in diffs)} of {len(diffs)}"
    )
    cand_last = np.array([cand[s][1][-1] for s in seeds])
    print(f"candidate mean {metric} at its last point: {cand_last.mean():.3f}")
    return 0


def _pct(level: float) -> str:
    """``0.95`` -> ``"95%"``, ``0.983`` -> ``"98.3%"``."""
    return f"{100 * level:.4g}%"


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if not 0 < a.level < 1:
        p.error(f"--level: expected a confidence in (0, 1), e.g. 0.95, got {a.level}")
    if a.pool:
        return pooled(a.pool, a.inputs, a.metric, a.level, a.common)
    if len(a.inputs) != 2:
        p.error("expected BASELINE.csv:strategy CANDIDATE.csv:strategy (or --pool A:B FILES)")
    return compare(a.inputs[0], a.inputs[1], a.metric, a.level, a.common)


if __name__ == "__main__":
    raise SystemExit(main())
