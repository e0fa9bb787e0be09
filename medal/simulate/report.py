"""A simulation's results: results.csv, learning curves and summary.md."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import api
from ..workspace import has_ledger
from .planning import RunSpec
from .records import (
    LABEL_COLUMNS,
    SECONDS_COLUMNS,
    label_counts,
    parse_metric,
    read_seconds,
)
from .stats import BASELINE, Curves, curve_area, paired_differences, t_interval

MAIN_METRICS = ("auroc", "accuracy", "balanced_accuracy")
METRIC_TITLES = {"auroc": "AUROC", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}


def collect_rows(specs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    """One row per (strategy, seed, model round) from the runs' ledgers.

    Metric values are copied as the ledger gives them: an undefined one may be ``None`` or NaN.
    """
    rows = []
    for spec in specs:
        if not has_ledger(spec.cfg.workspace):
            continue
        st = api.status(spec.cfg)
        score = {r["round"]: r["score_seconds"] for r in st.rounds}
        timed = read_seconds(spec.cfg.workspace)
        models = [m for m in st.models if m["round"] <= spec.rounds]
        given, holdout = label_counts(spec.cfg, [m["round"] for m in models])
        for m in models:
            row: dict[str, Any] = {
                "strategy": spec.strategy,
                "seed": spec.seed,
                "round": m["round"],
                "labels": given[m["round"]],
                "labels_train": m["n_labels"],
                "labels_holdout": holdout,
                "train_seconds": round(m["train_seconds"], 3),
                "score_seconds": ""
                if score.get(m["round"]) is None
                else round(score[m["round"]], 3),
                "query_seconds": "",
                "round_seconds": "",
                **timed.get(m["round"], {}),
            }
            for split in ("test", "validation"):
                for metric, v in sorted(st.metrics.get(m["round"], {}).get(split, {}).items()):
                    row[f"{split}/{metric}"] = v
            rows.append(row)
    return rows


def write_results(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """results.csv; an undefined metric is an empty cell."""
    fixed = ["strategy", "seed", "round", *LABEL_COLUMNS, *SECONDS_COLUMNS]
    metrics = sorted(
        {k for r in rows for k in r} - set(fixed), key=lambda k: (not k.startswith("test/"), k)
    )
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fixed + metrics, restval="")
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: ("" if parse_metric(v) is None else v) if k in metrics else v
                    for k, v in r.items()
                }
            )
    tmp.replace(path)


def _split(rows: Sequence[dict[str, Any]]) -> str:
    return "test" if any(k.startswith("test/") for r in rows for k in r) else "validation"


def curves(
    rows: Sequence[dict[str, Any]], key: str
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``{strategy: {seed: (labels [R], metric [R])}}`` sorted by round; undefined values
    (see :func:`undefined_points`) are left out."""
    out: dict[str, dict[int, list[tuple[int, float, float]]]] = {}
    for r in rows:
        v = parse_metric(r.get(key))
        if v is None:
            continue
        out.setdefault(r["strategy"], {}).setdefault(int(r["seed"]), []).append(
            (int(r["round"]), float(r["labels"]), v)
        )
    return {
        s: {
            seed: (np.array([p[1] for p in sorted(pts)]), np.array([p[2] for p in sorted(pts)]))
            for seed, pts in by_seed.items()
        }
        for s, by_seed in out.items()
    }


def read_curves(spec: str, metric: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{seed: (labels [R], test metric [R])}`` of one strategy from results.csv files:
    ``file[+file...]:strategy`` (several files joined, e.g. simulations of different seeds).
    Undefined points (empty cells) are left out."""
    files, strategy = spec.rsplit(":", 1)
    points: dict[int, list[tuple[float, float]]] = {}
    for f in files.split("+"):
        with open(Path(f), newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                v = parse_metric(r.get(f"test/{metric}", ""))
                if r["strategy"] == strategy and v is not None:
                    points.setdefault(int(r["seed"]), []).append((float(r["labels"]), v))
    return {
        seed: (np.array([x for x, _ in sorted(p)]), np.array([y for _, y in sorted(p)]))
        for seed, p in points.items()
    }


def undefined_points(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[str, int, int]]:
    """``(strategy, seed, round)`` of the rows that evaluated ``key``'s split but have no
    defined value for ``key`` (NaN, None, empty or absent): the points curves leave out.
    Empty when no row records ``key`` at all (a metric that was never computed)."""
    split = key.split("/", 1)[0] + "/"
    if not any(key in r for r in rows):
        return []
    return sorted(
        (r["strategy"], int(r["seed"]), int(r["round"]))
        for r in rows
        if any(k.startswith(split) for k in r) and parse_metric(r.get(key)) is None
    )


def _undefined_note(rows: Sequence[dict[str, Any]], key: str, title: str) -> str | None:
    bad = undefined_points(rows, key)
    if not bad:
        return None
    total = sum(1 for r in rows if any(k.startswith(key.split("/", 1)[0] + "/") for k in r))
    by_run: dict[tuple[str, int], list[int]] = {}
    for strategy, seed, round_no in bad:
        by_run.setdefault((strategy, seed), []).append(round_no)
    where = "; ".join(
        f"{s} seed {k} round{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
        for (s, k), r in sorted(by_run.items())
    )
    return (
        f"{title} is undefined at {len(bad)} of {total} points, left out of curves and "
        f"tables ({where}); a run's final value is then its last defined point."
    )


def _mean_curve(
    by_seed: dict[int, tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, mean, min and max per label count over the seeds with a value there."""
    xs = sorted({float(v) for x, _ in by_seed.values() for v in x})
    mean, lo, hi = [], [], []
    for v in xs:
        ys = [float(y[x == v][0]) for x, y in by_seed.values() if (x == v).any()]
        mean.append(np.mean(ys))
        lo.append(np.min(ys))
        hi.append(np.max(ys))
    return np.array(xs), np.array(mean), np.array(lo), np.array(hi)


def plot_curves(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """A learning-curve PNG per main metric: mean over seeds, min-max band, random dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    split = _split(rows)
    paths = []
    for metric in MAIN_METRICS:
        key = f"{split}/{metric}"
        data = curves(rows, key)
        if not data:
            continue
        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        n_seeds = max(len(v) for v in data.values())
        for strategy in sorted(data, key=lambda s: (s == BASELINE, s)):
            x, mean, lo, hi = _mean_curve(data[strategy])
            base = strategy == BASELINE
            (line,) = ax.plot(
                x,
                mean,
                marker=".",
                label=strategy,
                color="black" if base else None,
                linestyle="--" if base else "-",
            )
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("labels given (held-out validation labels included)")
        ax.set_ylabel(f"{split} {METRIC_TITLES[metric]}")
        title = f"{split} {METRIC_TITLES[metric]}: mean over {n_seeds} seed(s), band = min-max"
        n_bad = len(undefined_points(rows, key))
        if n_bad:
            title += f"\n{n_bad} undefined point(s) left out"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"curve_{split}_{metric}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def _fmt_ms(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "–"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _fmt_diff(v: float) -> str:
    return f"{v:+.3f}"


def _fmt_interval(values: Sequence[float]) -> str:
    mean, lo, hi = t_interval(values)
    if lo is None or hi is None:
        return f"{_fmt_diff(mean)} (n = 1, no interval)"
    return f"{_fmt_diff(mean)} [{_fmt_diff(lo)}, {_fmt_diff(hi)}]"


def _strategy_table(data: Curves, order: list[str], seeds: list[int], name: str) -> list[str]:
    """Per strategy: seeds, labels at the end, final value and area (mean ± sd); then both
    per seed."""
    lines = [
        f"| strategy | seeds | labels at end | final {name} | area under curve |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for strategy in order:
        by_seed = data[strategy]
        finals = [float(y[-1]) for _, y in by_seed.values()]
        final_labels = [float(x[-1]) for x, _ in by_seed.values()]
        aulc = [curve_area(x, y) for x, y in by_seed.values()]
        lines.append(
            f"| {strategy} | {len(by_seed)} | {np.mean(final_labels):.0f} | "
            f"{_fmt_ms(finals)} | {_fmt_ms(aulc)} |"
        )
    lines += [
        "",
        f"Per seed: final {name} / area under curve",
        "",
        "| seed | " + " | ".join(order) + " |",
        "| ---: |" + " ---: |" * len(order),
    ]
    for k in seeds:
        cells = [
            f"{data[s][k][1][-1]:.3f} / {curve_area(*data[s][k]):.3f}" if k in data[s] else "–"
            for s in order
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _paired_table(data: Curves, name: str) -> list[str]:
    """Each strategy minus random on the same seed: per seed and mean [95% t interval]."""
    diffs = paired_differences(data)
    if not diffs:
        return []
    lines = [
        "Paired difference to random (strategy − random on the same seed and "
        "start set): per seed, and mean [95% t interval] over the n seeds",
        "",
        "| strategy | n | area: per seed | area: mean [95% CI] "
        f"| final {name}: per seed | final: mean [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in diffs:
        lines.append(
            f"| {d.strategy} | {len(d.seeds)} | "
            f"{', '.join(_fmt_diff(v) for v in d.area)} | "
            f"{_fmt_interval(d.area)} | "
            f"{', '.join(_fmt_diff(v) for v in d.final)} | "
            f"{_fmt_interval(d.final)} |"
        )
    return [*lines, ""]


def _labels_to_reach(data: Curves, order: list[str], seeds: list[int], name: str) -> list[str]:
    """Per strategy and seed, the labels at which the metric first reaches random's final
    mean value."""
    if BASELINE not in data:
        return ["No random run: no paired differences and no labels-to-reach target.", ""]
    target = float(np.mean([y[-1] for _, y in data[BASELINE].values()]))
    lines = [
        f"Labels to reach random's final {target:.3f} (its mean over "
        f"{len(data[BASELINE])} seed(s)), per seed; never = not reached within "
        f"the run's labels",
        "",
        "| strategy | reached | " + " | ".join(f"seed {k}" for k in seeds) + " |",
        "| --- | ---: |" + " ---: |" * len(seeds),
    ]
    for strategy in order:
        by_seed = data[strategy]
        cells, hit = [], 0
        for k in seeds:
            if k not in by_seed:
                cells.append("–")
                continue
            x, y = by_seed[k]
            ok = y >= target - 1e-12
            if ok.any():
                hit += 1
                cells.append(f"{x[np.argmax(ok)]:.0f}")
            else:
                cells.append(f"never (≤{x[-1]:.0f})")
        lines.append(f"| {strategy} | {hit}/{len(by_seed)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _seconds(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in ("", None)]


def time_table(rows: Sequence[dict[str, Any]], pretraining: dict[str, float]) -> list[str]:
    """Markdown lines: where the simulation's wall-clock time went, per part, summed over runs
    and as the mean per model round (``SECONDS_COLUMNS``; pretraining per backbone)."""
    paired = [
        float(r["query_seconds"]) - float(r["score_seconds"])
        for r in rows
        if r.get("query_seconds") not in ("", None) and r.get("score_seconds") not in ("", None)
    ]
    parts = [
        (f"self-supervised pretraining ({len(pretraining)} backbones)", list(pretraining.values())),
        ("training (fitting the model)", _seconds(rows, "train_seconds")),
        ("MC scoring and selection", _seconds(rows, "score_seconds")),
        ("export of the round folder", paired),
        ("whole rounds (query, labelling, ingest, training)", _seconds(rows, "round_seconds")),
    ]
    lines = [
        "### Time by part",
        "",
        "| part | total s | n | mean s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, vals in parts:
        if vals:
            lines.append(f"| {name} | {sum(vals):.1f} | {len(vals)} | {np.mean(vals):.2f} |")
    return [*lines, ""]


def summarise(rows: Sequence[dict[str, Any]], pretraining: dict[str, float] | None = None) -> str:
    """Markdown, per main metric: per strategy the final value and the normalised area under the
    learning curve (mean ± sd over seeds, then per seed), the paired difference of each strategy
    to random per seed with the mean and a 95% t interval, and per seed the labels needed to
    first reach random's final mean value. Undefined points are left out, with a note. Then
    where the time went (:func:`time_table`; ``pretraining``: seconds per backbone)."""
    split = _split(rows)
    lines = []
    for metric in MAIN_METRICS:
        key = f"{split}/{metric}"
        data = curves(rows, key)
        title = f"{split} {METRIC_TITLES[metric]}"
        note = _undefined_note(rows, key, title)
        if not data:
            if note:
                lines += [f"### {title}", "", note, ""]
            continue
        name = METRIC_TITLES[metric]
        order = sorted(data, key=lambda s: (s != BASELINE, s))
        seeds = sorted({k for by_seed in data.values() for k in by_seed})
        lines += [f"### {title}", ""]
        if note:
            lines += [f"Note: {note}", ""]
        lines += _strategy_table(data, order, seeds, name)
        lines += _paired_table(data, name)
        lines += _labels_to_reach(data, order, seeds, name)
    lines += time_table(rows, pretraining or {})
    lines.append(
        "Labels: every label the simulated radiologist gave (start set and rounds, "
        "held-out validation labels included). Mean ± sd over seeds. Area under the "
        "learning curve: trapezoid area of the metric over labels, divided by the "
        "label range (1.0 = perfect from the start). 95% CI: Student t interval of "
        "the mean paired difference over the n seeds (t with n − 1 degrees of "
        "freedom)."
    )
    return "\n".join(lines) + "\n"
