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
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from medal.simulate import curve_area, read_curves, t_interval_or_nan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("baseline")
    p.add_argument("candidate")
    p.add_argument("--metric", default="auroc")
    a = p.parse_args(argv)
    base, cand = read_curves(a.baseline, a.metric), read_curves(a.candidate, a.metric)
    seeds = sorted(set(base) & set(cand))
    if not seeds:
        raise SystemExit("no seed is in both")
    target = float(np.mean([base[s][1][-1] for s in seeds]))
    at = int(np.median([base[s][0][-1] for s in seeds]))
    lo = max(max(base[s][0][0], cand[s][0][0]) for s in seeds)
    hi = min(min(base[s][0][-1], cand[s][0][-1]) for s in seeds)
    print(
        f"baseline {a.baseline}: mean test {a.metric} at its last point ({at} labels) "
        f"over seeds {seeds}: {target:.3f}"
    )
    print(
        f"{'seed':>4} {'baseline last':>14} {'candidate last':>15} {'labels to reach':>16} "
        f"{'area base':>10} {'area cand':>10} {'diff':>7}   (area over {lo:.0f}-{hi:.0f} labels)"
    )
    diffs, reach = [], []
    for s in seeds:
        bx, by = base[s]
        cx, cy = cand[s]
        hit = cx[cy >= target]
        reach.append(float(hit[0]) if len(hit) else float("nan"))
        ab, ac = curve_area(bx, by, lo, hi), curve_area(cx, cy, lo, hi)
        diffs.append(ac - ab)
        print(
            f"{s:>4} {by[-1]:>9.3f}@{bx[-1]:<4.0f} {cy[-1]:>10.3f}@{cx[-1]:<4.0f} "
            f"{'never' if math.isnan(reach[-1]) else f'{reach[-1]:.0f}':>16} {ab:>10.4f} "
            f"{ac:>10.4f} {ac - ab:>+7.4f}"
        )
    m, low, high = t_interval_or_nan(np.array(diffs))
    done = [r for r in reach if not math.isnan(r)]
    print(
        f"candidate reaches {target:.3f} in {len(done)} of {len(seeds)} seeds"
        + (f" (mean {np.mean(done):.0f} labels over those)" if done else "")
    )
    print(
        f"area difference candidate - baseline: {m:+.4f} [{low:+.4f}, {high:+.4f}] (95% t "
        f"interval over {len(seeds)} seeds); positive in {sum(d > 0 for d in diffs)} of "
        f"{len(diffs)}"
    )
    cand_last = np.array([cand[s][1][-1] for s in seeds])
    print(f"candidate mean {a.metric} at its last point: {cand_last.mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
