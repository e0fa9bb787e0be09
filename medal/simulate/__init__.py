"""Simulated active learning: compare strategies on a fully labelled set, hiding its labels.

Every (strategy, seed) run is an ordinary medal workspace driven through the public API, the
same way a team works with radiologists::

    train (model round 0) -> for each round: query (export) -> the oracle fills labels.csv
                                              -> ingest -> train (fine-tune)

The oracle plays the radiologist. It is built from a single ``lookup(source_path) -> label``
function and only ever sees the rows of an exported round's manifest, so the labels of images
that were not exported cannot leak into a run. Each lookup is also appended to the run's
``oracle.csv`` for audit.

Layout of the output folder ``<out>``::

    simulation.json                 settings (a rerun with other settings is refused)
    pool/                           links to every image of the labelled set (shared pool)
    cache/                          decode cache shared by all runs
    <strategy>/seed-<k>/            one workspace per run (ledger, checkpoints, rounds),
                                    plus start.csv (the start set), oracle.csv and
                                    seconds.csv (wall-clock seconds of each round)
    results.csv                     one row per (strategy, seed, model round)
    curve_test_<metric>.png         learning curves (mean and min-max band over seeds)
    summary.md                      per seed and paired to random: final value, area under
                                    the curve (95% t intervals); labels to reach random's final

Honest protocol by default: the start set is drawn at random, and no labelled validation set is
used unless one is passed (``SimulationSettings.validation``); each run then holds out
``train.validation_fraction`` of the labels it was given for validation. Every label the
simulated radiologist gave counts on every axis and table, held-out ones included.

A metric that is undefined on a split (NaN, or missing when read back from the ledger) is left
out of curves and summaries with a note; it never stops a simulation.

Everything is resumable: the ledger of each run says which rounds are done, and an
interrupted run continues where it stopped.

The package, in the order a simulation runs: :mod:`.oracle` (the hidden truth and the simulated
radiologist), :mod:`.planning` (settings, runs, start sets, validation), :mod:`.runner` (one
run's rounds, pretraining, workers, the whole simulation), :mod:`.stats` (curve areas,
intervals, paired differences; also used by the benchmark scripts), :mod:`.report`
(results.csv, curves, summary.md) and :mod:`.command` (``medal simulate``).
"""

from __future__ import annotations

from ..errors import SimulationError
from .command import command
from .oracle import Oracle, Truth, TruthEntry, round_manifest
from .planning import (
    BACKBONE_MODES,
    START_MODES,
    RunSpec,
    SimulationResult,
    SimulationSettings,
    choose_start,
    describe_backbones,
    describe_validation,
    plan_runs,
    read_truth,
    with_validation,
)
from .records import format_metric, parse_metric
from .report import (
    MAIN_METRICS,
    METRIC_TITLES,
    collect_rows,
    curves,
    plot_curves,
    read_curves,
    summarise,
    undefined_points,
    write_results,
)
from .runner import run_one, run_progress, simulate
from .stats import (
    BASELINE,
    Curves,
    PairedDifference,
    curve_area,
    paired_differences,
    t_interval,
    t_interval_or_nan,
)

__all__ = [
    "BACKBONE_MODES",
    "BASELINE",
    "Curves",
    "MAIN_METRICS",
    "METRIC_TITLES",
    "Oracle",
    "PairedDifference",
    "RunSpec",
    "START_MODES",
    "SimulationError",
    "SimulationResult",
    "SimulationSettings",
    "Truth",
    "TruthEntry",
    "choose_start",
    "collect_rows",
    "command",
    "curve_area",
    "curves",
    "describe_backbones",
    "describe_validation",
    "paired_differences",
    "plan_runs",
    "plot_curves",
    "read_curves",
    "read_truth",
    "round_manifest",
    "run_one",
    "run_progress",
    "simulate",
    "summarise",
    "t_interval",
    "t_interval_or_nan",
    "undefined_points",
    "with_validation",
    "write_results",
    "format_metric",
    "parse_metric",
]
