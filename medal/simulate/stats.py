"""The statistics of a simulation report: curve areas, t intervals, paired differences
to the baseline. The benchmark scripts use the same functions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BASELINE = "random"
"""The strategy every other one is paired with."""

Curves = dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]
"""``{strategy: {seed: (labels [R], metric [R])}}``, as :func:`medal.simulate.curves` gives
them."""


def curve_area(
    x: np.ndarray, y: np.ndarray, lo: float | None = None, hi: float | None = None
) -> float:
    """Area under the piecewise-linear learning curve ``y`` over ``x`` (labels, ascending),
    divided by the range of ``x``: the curve's mean value. Only the points with ``lo <= x <=
    hi`` count when a bound is given (to compare curves over the labels both reached). One point
    left: its value; none: NaN. The one definition of "area" in medal's reports."""
    keep = np.ones(len(x), dtype=bool)
    if lo is not None:
        keep &= x >= lo
    if hi is not None:
        keep &= x <= hi
    x, y = x[keep], y[keep]
    if len(x) == 0:
        return float("nan")
    if len(x) < 2 or x[-1] <= x[0]:
        return float(y[0])
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 / (x[-1] - x[0]))


def t_interval(
    values: Sequence[float], level: float = 0.95
) -> tuple[float, float | None, float | None]:
    """Mean and two-sided ``level`` Student t interval of the mean (``None`` bounds for n < 2):
    ``mean ± t(1 - (1 - level) / 2, n - 1) · sd / √n`` with the sample sd (n - 1)."""
    from scipy import stats

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class PairedDifference:
    """``strategy - baseline`` per seed both ran, for the area under the curve and the final
    value, with the mean and 95% t interval over those seeds."""

    strategy: str
    seeds: tuple[int, ...]
    area: tuple[float, ...]
    final: tuple[float, ...]

    @property
    def area_interval(self) -> tuple[float, float | None, float | None]:
        return t_interval(self.area)

    @property
    def final_interval(self) -> tuple[float, float | None, float | None]:
        return t_interval(self.final)


def paired_differences(
    data: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]], baseline: str = BASELINE
) -> list[PairedDifference]:
    """Per strategy other than ``baseline``: its difference to ``baseline`` on the same seeds
    (same start set), from :func:`curves`' output. Empty without a baseline."""
    if baseline not in data:
        return []
    base = data[baseline]
    out = []
    for strategy in sorted(s for s in data if s != baseline):
        seeds = tuple(sorted(set(data[strategy]) & set(base)))
        if not seeds:
            continue
        area = tuple(curve_area(*data[strategy][k]) - curve_area(*base[k]) for k in seeds)
        final = tuple(float(data[strategy][k][1][-1] - base[k][1][-1]) for k in seeds)
        out.append(PairedDifference(strategy, seeds, area, final))
    return out


def t_interval_or_nan(
    values: Sequence[float] | np.ndarray, level: float = 0.95
) -> tuple[float, float, float]:
    """:func:`t_interval` of ``values`` (``[n]``, one per seed) with NaN for the bounds it
    cannot give (n < 2): ``(mean, low, high)`` as floats, for printing with format specs."""
    mean, lo, hi = t_interval(list(values), level)
    return mean, float("nan") if lo is None else lo, float("nan") if hi is None else hi
