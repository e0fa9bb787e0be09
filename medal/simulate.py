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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from . import api
from .acquisition import available_strategies
from .config import Config
from .scan import scan_source
from .errors import DataError, MedalError, SimulationError
from .workspace import Workspace, cache_dir, has_ledger, kept_manifest, round_of_folder

MAIN_METRICS = ("auroc", "accuracy", "balanced_accuracy")
METRIC_TITLES = {"auroc": "AUROC", "accuracy": "accuracy",
                 "balanced_accuracy": "balanced accuracy"}
BASELINE = "random"
START_MODES = ("random", "class_balanced")
BACKBONE_MODES = ("per-seed", "shared")

# Config fields that differ between runs by design; every other field must match on resume.
_PER_RUN_KEYS = ("path", "workspace", "seed", "device", "num_workers")
_PER_RUN_DATA = ("labelled", "pool")
_PER_RUN_QUERY = ("strategy",)


# --- the hidden truth and the oracle ----------------------------------------------------------
@dataclass(frozen=True)
class TruthEntry:
    """One image of the fully labelled set: the original file, its label, its pool link."""

    source: Path
    label: str
    link: Path


class Truth:
    """The hidden labels of the fully labelled set, keyed by the pool path a run sees."""

    def __init__(self, entries: Sequence[TruthEntry]) -> None:
        self.entries = list(entries)
        self._by_link = {str(e.link): e.label for e in self.entries}

    def lookup(self, source_path: str) -> str:
        """The label of the pool image at ``source_path`` (as written in a round manifest)."""
        try:
            return self._by_link[str(Path(source_path))]
        except KeyError:
            raise SimulationError(f"the oracle was asked about {source_path}, which is not in "
                                  f"the simulation's labelled set") from None


class Oracle:
    """A simulated radiologist that answers for the images exported in a round, and only those.

    It holds nothing but ``lookup``; it calls it once per row of the round's manifest.
    ``log`` (optional) is a CSV file where each question and answer is appended.
    """

    def __init__(self, lookup: Callable[[str], str], log: Path | None = None) -> None:
        self._lookup = lookup
        self._log = log

    def label_round(self, folder: Path, manifest: Path) -> int:
        """Fill ``folder/labels.csv`` from the hidden truth of the images listed in ``manifest``.

        Returns the number of labelled rows. Rewriting is idempotent, so a round whose ingest
        was interrupted can be answered again.
        """
        with open(manifest, newline="", encoding="utf-8") as f:
            source = {r["file"]: r["source_path"] for r in csv.DictReader(f)}
        with open(folder / "labels.csv", newline="", encoding="utf-8-sig") as f:
            files = [r["file"] for r in csv.DictReader(f)]
        missing = sorted(set(files) - set(source))
        if missing:
            raise SimulationError(f"{manifest}: no source path for {', '.join(missing)}")
        answers = [(name, self._lookup(_unneutralise(source[name]))) for name in files]
        tmp = folder / ".labels.csv.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "label"])
            w.writerows(answers)
        tmp.replace(folder / "labels.csv")
        if self._log is not None:
            new = not self._log.is_file()
            with open(self._log, "a", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["round_folder", "file", "source_path", "label"])
                w.writerows([folder.name, n, _unneutralise(source[n]), lab]
                            for n, lab in answers)
        return len(answers)


def _unneutralise(cell: str) -> str:
    """Undo labelling.neutralise's leading quote (added to cells that look like formulas)."""
    return cell[1:] if cell.startswith("'") and len(cell) > 1 and cell[1] in "=+-@\t\r" else cell


def round_manifest(ws_root: Path, folder: Path) -> Path:
    """The manifest with source paths for a round folder (kept in the workspace when the
    round was de-identified)."""
    in_folder = folder / "manifest.csv"
    with open(in_folder, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if "source_path" in header:
        return in_folder
    kept = kept_manifest(ws_root, round_of_folder(folder))
    if not kept.is_file():
        raise SimulationError(f"{folder}: the manifest has no source paths and {kept} is missing")
    return kept


# --- settings and preparation -----------------------------------------------------------------
@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate. ``start`` is ``random``, ``class_balanced``, ``class:<name>`` (a
    single-class start) or the path of a file list (one path per line, or a CSV with a
    ``file`` column; relative paths resolve against the list's folder)."""

    truth: tuple[Path, ...]
    out: Path
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int
    budget: int
    start: str = "random"
    start_size: int = 20
    validation: str = "none"
    """``none``: no labelled validation set; each run holds out ``train.validation_fraction`` of
    the labels it was given (counted as labels). ``config``: the config's ``data.validation``.
    Otherwise the path of a labelled validation set. Labels of a validation set passed this way
    are not counted as labels given."""
    workers: int = 1
    threads: int = 0
    """torch threads per worker process; 0 = the CPU count divided by ``workers``."""
    verbose: bool = True
    backbones: str = "per-seed"
    """With a self-supervised backbone (``representation.method``): ``per-seed`` pretrains one
    backbone per seed (``representation.seed`` = the run's seed), so the seeds' spread and the
    paired intervals include the pretraining's own variation; ``shared`` pretrains one, with
    the config's ``representation.seed`` (default its ``seed``), for every run (faster; the
    intervals then hold for that one backbone only)."""


@dataclass(frozen=True)
class RunSpec:
    """One (strategy, seed) run: its config (workspace, start set, pool, strategy set)."""

    strategy: str
    seed: int
    cfg: Config
    rounds: int
    oracle_log: Path
    verbose: bool


@dataclass
class SimulationResult:
    out: Path
    rows: list[dict[str, Any]]
    summary: str
    plots: list[Path]
    seconds: float
    failures: dict[str, str] = field(default_factory=dict)


def read_truth(sources: Iterable[Path], classes: Sequence[str]) -> list[tuple[Path, str]]:
    """``(resolved file, label)`` for every image of the labelled sources (class folders or
    CSV ``file,label``), sorted by path; the same file listed twice must agree."""
    found: dict[Path, str] = {}
    for src in sources:
        for e in scan_source(Path(src), classes):
            p = e.path.resolve()
            if found.setdefault(p, e.label) != e.label:
                raise SimulationError(f"{p} is labelled both {found[p]!r} and {e.label!r}")
    if not found:
        raise SimulationError("the labelled set for the simulation is empty")
    return sorted(found.items())


def build_pool(out: Path, truth: Sequence[tuple[Path, str]]) -> list[TruthEntry]:
    """Create ``<out>/pool`` (once): a link (or copy) per image of the labelled set.

    The runs' pool is this folder; start-set images are labelled in each run, so they leave
    that run's pool by themselves. Built under a temporary name and renamed, so an interrupted
    build is redone rather than half-used.
    """
    pool = out.resolve() / "pool"
    width = len(str(len(truth)))
    names = [f"{i:0{width}d}_{src.name}" for i, (src, _) in enumerate(truth)]
    if not pool.is_dir():
        tmp = out.resolve() / ".pool.tmp"
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
        tmp.mkdir(parents=True, exist_ok=True)
        for (src, _), name in zip(truth, names):
            try:
                os.symlink(src, tmp / name)
            except OSError:  # file systems without symlinks: copy
                shutil.copyfile(src, tmp / name)
        tmp.rename(pool)
    entries = [TruthEntry(src, label, pool / name) for (src, label), name in zip(truth, names)]
    absent = [e.link for e in entries if not e.link.exists()]
    if absent:
        raise SimulationError(f"{pool} does not match the labelled set ({len(absent)} missing, "
                              f"e.g. {absent[0]}); use a new output folder")
    return entries


def choose_start(entries: Sequence[TruthEntry], mode: str, size: int, seed: int,
                 classes: Sequence[str]) -> list[TruthEntry]:
    """The start set of one seed (the same for every strategy, so runs compare in pairs)."""
    rng = np.random.default_rng([seed, 20240521])
    if mode == "random":
        if size > len(entries):
            raise SimulationError(f"start size {size} is larger than the labelled set "
                                  f"({len(entries)})")
        return [entries[i] for i in sorted(rng.choice(len(entries), size, replace=False))]
    if mode == "class_balanced" or mode.startswith("class:"):
        if mode == "class_balanced":
            want = {c: size // len(classes) + (i < size % len(classes))
                    for i, c in enumerate(classes)}
        else:
            name = {c.lower(): c for c in classes}.get(mode[len("class:"):].lower())
            if name is None:
                raise SimulationError(f"start {mode!r}: unknown class; classes: "
                                      f"{', '.join(classes)}")
            want = {name: size}
        chosen: list[TruthEntry] = []
        for c, k in want.items():
            of_class = [e for e in entries if e.label == c]
            if k > len(of_class):
                raise SimulationError(f"start set: {k} images of class {c!r} wanted, the "
                                      f"labelled set has {len(of_class)}")
            chosen += [of_class[i] for i in sorted(rng.choice(len(of_class), k, replace=False))]
        return sorted(chosen, key=lambda e: str(e.source))
    return _start_from_list(Path(mode), entries)


def _start_from_list(path: Path, entries: Sequence[TruthEntry]) -> list[TruthEntry]:
    if not path.is_file():
        raise SimulationError(f"start must be one of {', '.join(START_MODES)}, class:<name> or "
                              f"an existing file list; got {str(path)!r}")
    text = path.read_text(encoding="utf-8-sig")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and "file" in [h.strip().lower() for h in lines[0].split(",")]:
        rows = list(csv.DictReader(lines))
        names = [next(v for k, v in r.items() if k.strip().lower() == "file").strip()
                 for r in rows]
    else:
        names = lines
    by_source = {e.source: e for e in entries}
    chosen, unknown = [], []
    for n in names:
        p = Path(n).expanduser()
        p = (p if p.is_absolute() else path.parent / p).resolve()
        (chosen.append(by_source[p]) if p in by_source else unknown.append(n))
    if unknown:
        raise SimulationError(f"{path}: {len(unknown)} file(s) are not in the labelled set, "
                              f"e.g. {unknown[0]}")
    if not chosen:
        raise SimulationError(f"{path}: the start list is empty")
    return list({e.source: e for e in chosen}.values())


def with_validation(cfg: Config, validation: str) -> Config:
    """``cfg`` with the validation set a simulation uses (see ``SimulationSettings``)."""
    if validation == "config":
        return cfg
    if validation == "none":
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, validation=None))
    path = Path(validation).expanduser().resolve()
    if not path.exists():
        raise SimulationError(f"validation must be none, config or an existing folder or CSV "
                              f"of labelled images; got {validation!r}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, validation=path))


def describe_validation(cfg: Config, validation: str) -> str:
    """One sentence on the validation set the runs use, for the summary and the console."""
    used = with_validation(cfg, validation).data.validation
    if used is not None:
        return (f"labelled validation set {used} (its labels are not counted as labels given; "
                f"it picks the best epoch and is reported)")
    frac = cfg.train.validation_fraction
    text = (f"no labelled validation set; each run holds out train.validation_fraction = "
            f"{frac:g} of its start labels for validation, and those labels are counted"
            if frac > 0 else "none (train.validation_fraction = 0): no model selection")
    if cfg.data.validation is not None:
        text += (f" (the config's data.validation, {cfg.data.validation}, is not used; "
                 f"--validation config uses it)")
    return text


def describe_backbones(cfg: Config, s: SimulationSettings) -> str:
    """One sentence on the self-supervised backbones the runs start from."""
    if cfg.representation.method == "none":
        return "Backbone: no self-supervised pretraining (representation.method = \"none\")."
    if s.backbones == "per-seed":
        return ("Backbones: one self-supervised pretraining per seed (representation.seed = "
                "the seed), shared by that seed's strategies; the spread over seeds includes "
                "the pretraining's.")
    return (f"Backbone: one self-supervised pretraining (representation.seed = "
            f"{api.representation_seed(cfg)}) for every run; the intervals hold for that "
            f"backbone only (--backbones per-seed varies it).")


def _fingerprint(cfg: Config, s: SimulationSettings) -> dict[str, Any]:
    """What must be equal for a rerun to continue the same simulation."""
    d = cfg.to_dict()
    for k in _PER_RUN_KEYS:
        d.pop(k, None)
    for k in _PER_RUN_DATA:
        d["data"].pop(k, None)
    for k in _PER_RUN_QUERY:
        d["query"].pop(k, None)
    d["query"]["budget"] = s.budget
    return {"config": d, "truth": [str(Path(t).resolve()) for t in s.truth],
            "start": s.start if s.start in START_MODES or s.start.startswith("class:")
            else str(Path(s.start).resolve()), "start_size": s.start_size,
            "backbones": s.backbones}


def _check_settings(out: Path, fingerprint: dict[str, Any]) -> None:
    path = out / "simulation.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != fingerprint:
            changed = sorted(k for k in set(before) | set(fingerprint)
                             if before.get(k) != fingerprint.get(k))
            raise SimulationError(f"{out} holds a simulation with other settings (differs in: "
                                  f"{', '.join(changed)}); use another --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".simulation.json.tmp"
    tmp.write_text(json.dumps(fingerprint, indent=2), encoding="utf-8")
    tmp.replace(path)


def plan_runs(cfg: Config, s: SimulationSettings) -> tuple[list[RunSpec], list[TruthEntry]]:
    """Prepare the output folder (settings, pool, start sets) and one spec per run."""
    known = available_strategies()
    bad = [x for x in s.strategies if x not in known]
    if bad:
        raise SimulationError(f"unknown strategy {', '.join(bad)}; valid: {', '.join(known)}")
    if not s.strategies or not s.seeds:
        raise SimulationError("at least one strategy and one seed are needed")
    if s.rounds < 0 or s.budget < 1 or s.start_size < 1:
        raise SimulationError("rounds must be >= 0, budget and start size >= 1")
    if s.backbones not in BACKBONE_MODES:
        raise SimulationError(f"backbones must be one of {', '.join(BACKBONE_MODES)}, got "
                              f"{s.backbones!r}")
    cfg = with_validation(cfg, s.validation)
    out = s.out.resolve()
    truth = read_truth(s.truth, cfg.classes)
    _check_settings(out, _fingerprint(cfg, s))
    entries = build_pool(out, truth)
    shared_cache = cache_dir(out)  # a workspace-shaped cache the run workspaces share
    specs = []
    for seed in s.seeds:
        start = choose_start(entries, s.start, s.start_size, seed, cfg.classes)
        for strategy in s.strategies:
            run_dir = out / strategy / f"seed-{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            start_csv = run_dir / "start.csv"
            if not start_csv.is_file():
                tmp = run_dir / ".start.csv.tmp"
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f)
                    w.writerow(["file", "label"])
                    w.writerows([str(e.link), e.label] for e in start)
                tmp.replace(start_csv)
            if not cache_dir(run_dir).exists():
                # workspaces keep their caches in <workspace>/cache (decoded images when
                # image.cache is on, pretrained backbones and their features always); pointing
                # each one at the same folder decodes and pretrains once for the whole
                # simulation
                shared_cache.mkdir(exist_ok=True)
                cache_dir(run_dir).symlink_to(shared_cache, target_is_directory=True)
            run_cfg = dataclasses.replace(
                cfg, workspace=run_dir, seed=seed,
                data=dataclasses.replace(cfg.data, labelled=start_csv, pool=out / "pool"),
                query=dataclasses.replace(cfg.query, strategy=strategy, budget=s.budget),
                representation=dataclasses.replace(
                    cfg.representation, seed=seed if s.backbones == "per-seed"
                    else api.representation_seed(cfg)))
            specs.append(RunSpec(strategy, seed, run_cfg, s.rounds, run_dir / "oracle.csv",
                                 s.verbose))
    return specs, entries


# --- one run ----------------------------------------------------------------------------------
def _ledger_state(cfg: Config) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """Model rounds trained and exported rounds (by number) recorded in a run's ledger."""
    if not has_ledger(cfg.workspace):
        return set(), {}
    st = api.status(cfg)
    return {m["round"] for m in st.models}, {r["round"]: r for r in st.rounds}


def _pool_is_empty(cfg: Config) -> bool:
    with Workspace(cfg) as ws:
        return not ws.sync().pool


def run_one(spec: RunSpec, oracle: Oracle) -> int:
    """Bring one run up to ``spec.rounds`` labelling rounds; returns the model rounds trained
    now (0 when it was already complete). Finished steps, read from the ledger, are skipped."""
    cfg, name = spec.cfg, f"{spec.strategy} seed {spec.seed}"
    with Workspace(cfg):  # finishes or undoes an export that an interruption cut short
        pass
    trained, rounds = _ledger_state(cfg)
    done = 0

    def train(t0: float | None, query_seconds: float | None) -> None:
        """Train this round's model; ``t0``: when the round started (None: it was resumed,
        so its time is unknown), ``query_seconds``: its query's time (None: round 0 or
        unknown)."""
        nonlocal done
        r = api.train(cfg, progress=False)
        done += 1
        round_seconds = None if t0 is None else time.perf_counter() - t0
        _record_seconds(cfg.workspace, r.model_round, query_seconds, round_seconds)
        if spec.verbose:
            m = r.metrics.get("test") or r.metrics.get("validation") or {}
            given, holdout = _label_counts(cfg, [r.model_round])
            print(f"[{name}] model round {r.model_round}: {given[r.model_round]} labels given "
                  f"({r.n_labels} in training, {holdout} held out for validation), "
                  f"AUROC {_fmt_value(m.get('auroc'))}, "
                  f"accuracy {_fmt_value(m.get('accuracy'))} (training {r.seconds:.1f} s"
                  + ("" if round_seconds is None else f", whole round {round_seconds:.1f} s")
                  + ")", flush=True)

    if 0 not in trained:
        train(time.perf_counter(), None)
    for round_no in range(1, spec.rounds + 1):
        if round_no in trained:
            continue
        rec = rounds.get(round_no)
        t0: float | None = None
        query_seconds = None
        if rec is None:
            try:
                t0 = time.perf_counter()
                folder = api.query(cfg, progress=False).folder
                query_seconds = time.perf_counter() - t0
            except DataError:
                if _pool_is_empty(cfg):
                    if spec.verbose:
                        print(f"[{name}] the pool is exhausted after round "
                              f"{round_no - 1}", flush=True)
                    break
                raise
        else:
            folder = Path(rec["folder"])
        if rec is None or not rec["ingested"]:
            oracle.label_round(folder, round_manifest(cfg.workspace, folder))
            api.ingest(cfg, folder)
        train(t0, query_seconds)
    return done


SECONDS_COLUMNS = ("train_seconds", "score_seconds", "query_seconds", "round_seconds")
"""results.csv's timings, wall-clock seconds: ``train_seconds`` fitting the model only (from
the ledger); ``score_seconds`` MC-dropout scoring and selection of the round's images (from the
ledger; empty for round 0); ``query_seconds`` the whole query: scoring, selection and export of
the round folder (copies, previews, manifest; empty for round 0); ``round_seconds`` the whole
round: query, simulated labelling, ingest and training with its image loading, evaluation and
checkpoint (round 0: the first training). The last two are measured by the run and kept in its
``seconds.csv``; they are empty for a round that an interruption split in two."""


def _record_seconds(run_dir: Path, model_round: int, query_seconds: float | None,
                    round_seconds: float | None) -> None:
    """Append one model round's timings to ``<run>/seconds.csv`` (a later row wins)."""
    path = run_dir / "seconds.csv"
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["round", "query_seconds", "round_seconds"])
        w.writerow([model_round, *("" if v is None else round(v, 3)
                                   for v in (query_seconds, round_seconds))])


def _read_seconds(run_dir: Path) -> dict[int, dict[str, str]]:
    """``{model round: {"query_seconds": s, "round_seconds": s}}`` from ``seconds.csv``; an
    unmeasured value is ``""``."""
    path = run_dir / "seconds.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {int(r["round"]): {k: float(r[k]) if r.get(k) else ""
                                  for k in ("query_seconds", "round_seconds")}
                for r in csv.DictReader(f) if (r.get("round") or "").isdigit()}


def pretrain_backbones(specs: Sequence[RunSpec], s: SimulationSettings, threads: int) -> None:
    """Pretrain (or find in the shared cache) every self-supervised backbone the runs start
    from, before any run starts, so that two workers never pretrain the same one: one per
    ``representation.seed`` among the runs, in parallel over ``s.workers`` processes."""
    first: dict[int, RunSpec] = {}
    for spec in specs:
        if spec.cfg.representation.method != "none":
            first.setdefault(api.representation_seed(spec.cfg), spec)
    todo = [(f"backbone seed {k}", spec.cfg) for k, spec in sorted(first.items())]
    if s.workers <= 1 or len(todo) <= 1:
        for name, cfg in todo:
            line = api.pretrain_representation(cfg, progress=s.verbose)
            if s.verbose:
                print(f"{name}: {line}", flush=True)
        return
    with ProcessPoolExecutor(max_workers=min(s.workers, len(todo)),
                             mp_context=get_context("spawn")) as ex:
        futures = {ex.submit(_pretrain_in_worker, cfg, threads): name for name, cfg in todo}
        for fut in as_completed(futures):
            line = fut.result()
            if s.verbose:
                print(f"{futures[fut]}: {line}", flush=True)


def _pretrain_in_worker(cfg: Config, threads: int) -> str:
    """Process-pool entry point: one backbone's pretraining."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return api.pretrain_representation(cfg, progress=False)


def _run_in_worker(spec: RunSpec, entries: list[TruthEntry], threads: int) -> tuple[str, int]:
    """Process-pool entry point: one run with its own oracle over the shared truth."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    oracle = Oracle(Truth(entries).lookup, spec.oracle_log)
    return f"{spec.strategy}/seed-{spec.seed}", run_one(spec, oracle)


# --- results, curves, summary -----------------------------------------------------------------
LABEL_COLUMNS = ("labels", "labels_train", "labels_holdout")
"""results.csv's label counts: ``labels`` every class label the simulated radiologist gave up
to that model round (start set and ingested rounds, held-out validation labels included; the
x axis of every curve and table), ``labels_train`` those the model was trained on,
``labels_holdout`` those held out for validation (``train.validation_fraction``, when no
validation set was passed). ``labels - labels_train - labels_holdout`` were unreadable."""


def _labels_given(records: Sequence[Any], classes: Sequence[str],
                  model_rounds: Iterable[int]) -> dict[int, int]:
    """``{model round k: images whose latest label recorded in rounds <= k is a class}``.

    ``records`` are the ledger's label rows in insertion order (``image_id``, ``label``,
    ``round``); the model of round k is trained after the labels of round k are ingested.
    """
    wanted = set(classes)
    out = {}
    for k in model_rounds:
        latest: dict[str, str] = {}
        for rec in records:
            if rec.round <= k:
                latest[rec.image_id] = rec.label
        out[k] = sum(1 for lab in latest.values() if lab in wanted)
    return out


def _label_counts(cfg: Config, model_rounds: Sequence[int]) -> tuple[dict[int, int], int]:
    """Labels given per model round and the size of the frozen validation hold-out."""
    with Workspace(cfg, lock=False) as ws:
        records = ws.db.labels()
        chosen = ws.db.holdout() or []
        current = ws.db.current_labels()
    holdout = sum(1 for i in chosen if current.get(i) in cfg.classes)
    return _labels_given(records, cfg.classes, model_rounds), holdout


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
        timed = _read_seconds(spec.cfg.workspace)
        models = [m for m in st.models if m["round"] <= spec.rounds]
        given, holdout = _label_counts(spec.cfg, [m["round"] for m in models])
        for m in models:
            row: dict[str, Any] = {"strategy": spec.strategy, "seed": spec.seed,
                                   "round": m["round"], "labels": given[m["round"]],
                                   "labels_train": m["n_labels"], "labels_holdout": holdout,
                                   "train_seconds": round(m["train_seconds"], 3),
                                   "score_seconds": "" if score.get(m["round"]) is None
                                   else round(score[m["round"]], 3),
                                   "query_seconds": "", "round_seconds": "",
                                   **timed.get(m["round"], {})}
            for split in ("test", "validation"):
                for metric, v in sorted(st.metrics.get(m["round"], {}).get(split, {}).items()):
                    row[f"{split}/{metric}"] = v
            rows.append(row)
    return rows


def _value(v: Any) -> float | None:
    """A metric cell as a float; ``None`` when undefined (None, empty, NaN, infinite)."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt_value(v: Any, digits: int = 3) -> str:
    f = _value(v)
    return "–" if f is None else f"{f:.{digits}f}"


def write_results(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """results.csv; an undefined metric is an empty cell."""
    fixed = ["strategy", "seed", "round", *LABEL_COLUMNS, *SECONDS_COLUMNS]
    metrics = sorted({k for r in rows for k in r} - set(fixed),
                     key=lambda k: (not k.startswith("test/"), k))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fixed + metrics, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _value(v) is None else v) if k in metrics else v
                        for k, v in r.items()})
    tmp.replace(path)


def _split(rows: Sequence[dict[str, Any]]) -> str:
    return "test" if any(k.startswith("test/") for r in rows for k in r) else "validation"


def curves(rows: Sequence[dict[str, Any]], key: str
           ) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``{strategy: {seed: (labels [R], metric [R])}}`` sorted by round; undefined values
    (see :func:`undefined_points`) are left out."""
    out: dict[str, dict[int, list[tuple[int, float, float]]]] = {}
    for r in rows:
        v = _value(r.get(key))
        if v is None:
            continue
        out.setdefault(r["strategy"], {}).setdefault(int(r["seed"]), []).append(
            (int(r["round"]), float(r["labels"]), v))
    return {s: {seed: (np.array([p[1] for p in sorted(pts)]), np.array([p[2] for p in
                                                                         sorted(pts)]))
                for seed, pts in by_seed.items()} for s, by_seed in out.items()}


def undefined_points(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[str, int, int]]:
    """``(strategy, seed, round)`` of the rows that evaluated ``key``'s split but have no
    defined value for ``key`` (NaN, None, empty or absent): the points curves leave out.
    Empty when no row records ``key`` at all (a metric that was never computed)."""
    split = key.split("/", 1)[0] + "/"
    if not any(key in r for r in rows):
        return []
    return sorted((r["strategy"], int(r["seed"]), int(r["round"])) for r in rows
                  if any(k.startswith(split) for k in r) and _value(r.get(key)) is None)


def _undefined_note(rows: Sequence[dict[str, Any]], key: str, title: str) -> str | None:
    bad = undefined_points(rows, key)
    if not bad:
        return None
    total = sum(1 for r in rows if any(k.startswith(key.split("/", 1)[0] + "/") for k in r))
    by_run: dict[tuple[str, int], list[int]] = {}
    for strategy, seed, round_no in bad:
        by_run.setdefault((strategy, seed), []).append(round_no)
    where = "; ".join(f"{s} seed {k} round{'s' if len(r) > 1 else ''} "
                      f"{', '.join(map(str, r))}" for (s, k), r in sorted(by_run.items()))
    return (f"{title} is undefined at {len(bad)} of {total} points, left out of curves and "
            f"tables ({where}); a run's final value is then its last defined point.")


def _mean_curve(by_seed: dict[int, tuple[np.ndarray, np.ndarray]]
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
            style = dict(color="black", linestyle="--") if strategy == BASELINE else {}
            line, = ax.plot(x, mean, marker=".", label=strategy, **style)
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


def _normalised_area(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under ``y`` over ``x``, divided by the range of ``x``."""
    if len(x) < 2 or x[-1] <= x[0]:
        return float(y[0])
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 / (x[-1] - x[0]))


def t_interval(values: Sequence[float], level: float = 0.95
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


def paired_differences(data: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]],
                       baseline: str = BASELINE) -> list[PairedDifference]:
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
        area = tuple(_normalised_area(*data[strategy][k]) - _normalised_area(*base[k])
                     for k in seeds)
        final = tuple(float(data[strategy][k][1][-1] - base[k][1][-1]) for k in seeds)
        out.append(PairedDifference(strategy, seeds, area, final))
    return out


def _fmt_diff(v: float) -> str:
    return f"{v:+.3f}"


def _fmt_interval(values: Sequence[float]) -> str:
    mean, lo, hi = t_interval(values)
    if lo is None or hi is None:
        return f"{_fmt_diff(mean)} (n = 1, no interval)"
    return f"{_fmt_diff(mean)} [{_fmt_diff(lo)}, {_fmt_diff(hi)}]"


Curves = dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]
"""``{strategy: {seed: (labels [R], metric [R])}}``, as :func:`curves` gives them."""


def _strategy_table(data: Curves, order: list[str], seeds: list[int], name: str) -> list[str]:
    """Per strategy: seeds, labels at the end, final value and area (mean ± sd); then both
    per seed."""
    lines = [f"| strategy | seeds | labels at end | final {name} | area under curve |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for strategy in order:
        by_seed = data[strategy]
        finals = [float(y[-1]) for _, y in by_seed.values()]
        final_labels = [float(x[-1]) for x, _ in by_seed.values()]
        aulc = [_normalised_area(x, y) for x, y in by_seed.values()]
        lines.append(f"| {strategy} | {len(by_seed)} | {np.mean(final_labels):.0f} | "
                     f"{_fmt_ms(finals)} | {_fmt_ms(aulc)} |")
    lines += ["", f"Per seed: final {name} / area under curve", "",
              "| seed | " + " | ".join(order) + " |",
              "| ---: |" + " ---: |" * len(order)]
    for k in seeds:
        cells = [f"{data[s][k][1][-1]:.3f} / {_normalised_area(*data[s][k]):.3f}"
                 if k in data[s] else "–" for s in order]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _paired_table(data: Curves, name: str) -> list[str]:
    """Each strategy minus random on the same seed: per seed and mean [95% t interval]."""
    diffs = paired_differences(data)
    if not diffs:
        return []
    lines = ["Paired difference to random (strategy − random on the same seed and "
             "start set): per seed, and mean [95% t interval] over the n seeds", "",
             "| strategy | n | area: per seed | area: mean [95% CI] "
             f"| final {name}: per seed | final: mean [95% CI] |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for d in diffs:
        lines.append(f"| {d.strategy} | {len(d.seeds)} | "
                     f"{', '.join(_fmt_diff(v) for v in d.area)} | "
                     f"{_fmt_interval(d.area)} | "
                     f"{', '.join(_fmt_diff(v) for v in d.final)} | "
                     f"{_fmt_interval(d.final)} |")
    return [*lines, ""]


def _labels_to_reach(data: Curves, order: list[str], seeds: list[int], name: str
                     ) -> list[str]:
    """Per strategy and seed, the labels at which the metric first reaches random's final
    mean value."""
    if BASELINE not in data:
        return ["No random run: no paired differences and no labels-to-reach target.", ""]
    target = float(np.mean([y[-1] for _, y in data[BASELINE].values()]))
    lines = [f"Labels to reach random's final {target:.3f} (its mean over "
             f"{len(data[BASELINE])} seed(s)), per seed; never = not reached within "
             f"the run's labels", "",
             "| strategy | reached | " + " | ".join(f"seed {k}" for k in seeds) + " |",
             "| --- | ---: |" + " ---: |" * len(seeds)]
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


def summarise(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown, per main metric: per strategy the final value and the normalised area under the
    learning curve (mean ± sd over seeds, then per seed), the paired difference of each strategy
    to random per seed with the mean and a 95% t interval, and per seed the labels needed to
    first reach random's final mean value. Undefined points are left out, with a note."""
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
    lines.append("Labels: every label the simulated radiologist gave (start set and rounds, "
                 "held-out validation labels included). Mean ± sd over seeds. Area under the "
                 "learning curve: trapezoid area of the metric over labels, divided by the "
                 "label range (1.0 = perfect from the start). 95% CI: Student t interval of "
                 "the mean paired difference over the n seeds (t with n − 1 degrees of "
                 "freedom).")
    return "\n".join(lines) + "\n"


# --- the whole simulation ---------------------------------------------------------------------
def _failed(failures: dict[str, str], run: str, e: Exception, verbose: bool) -> None:
    """Record a run that raised; the simulation goes on with the other runs."""
    failures[run] = f"{type(e).__name__}: {e}" if not isinstance(e, MedalError) else str(e)
    print(f"[{run}] failed: {failures[run]}", file=sys.stderr, flush=True)
    if verbose and not isinstance(e, MedalError):
        traceback.print_exception(e, file=sys.stderr)


def run_progress(done: int, total: int, elapsed: float, name: str) -> str:
    """``run 3 of 10 finished (bald/seed-2); 2.5 min so far, about 5.8 min left``: the time left
    is the mean time per finished run so far times the runs still to go."""
    left = elapsed / done * (total - done)
    tail = f", about {left / 60:.1f} min left" if done < total else ""
    return f"run {done} of {total} finished ({name}); {elapsed / 60:.1f} min so far{tail}"


def simulate(cfg: Config, s: SimulationSettings) -> SimulationResult:
    """Run (or resume) every (strategy, seed) run, then write results, curves and summary."""
    t0 = time.perf_counter()
    specs, entries = plan_runs(cfg, s)
    failures: dict[str, str] = {}
    threads = s.threads or max(1, (os.cpu_count() or 1) // max(1, s.workers))
    pretrain_backbones(specs, s, threads)
    if s.workers <= 1:
        import torch

        if s.threads > 0:
            torch.set_num_threads(s.threads)
        truth = Truth(entries)
        for k, spec in enumerate(specs, 1):
            name = f"{spec.strategy}/seed-{spec.seed}"
            try:
                run_one(spec, Oracle(truth.lookup, spec.oracle_log))
            except Exception as e:  # one failed run must not lose the others' results
                _failed(failures, name, e, s.verbose)
            if s.verbose:
                print(run_progress(k, len(specs), time.perf_counter() - t0, name), flush=True)
    else:
        with ProcessPoolExecutor(max_workers=s.workers, mp_context=get_context("spawn")) as ex:
            futures = {ex.submit(_run_in_worker, spec, entries, threads):
                       f"{spec.strategy}/seed-{spec.seed}" for spec in specs}
            for k, fut in enumerate(as_completed(futures), 1):
                try:
                    fut.result()
                except Exception as e:
                    _failed(failures, futures[fut], e, s.verbose)
                if s.verbose:
                    print(run_progress(k, len(specs), time.perf_counter() - t0, futures[fut]),
                          flush=True)
    out = s.out.resolve()
    rows = collect_rows(specs)
    write_results(out / "results.csv", rows)
    plots = plot_curves(rows, out) if rows else []
    summary = summarise(rows) if rows else "no results yet\n"
    seconds = time.perf_counter() - t0
    header = (f"# Simulation summary\n\n{len(s.strategies)} strategies × {len(s.seeds)} seeds "
              f"({', '.join(map(str, s.seeds))}), {s.rounds} rounds of {s.budget} labels, "
              f"start: {s.start} ({s.start_size} labels unless a list).\n"
              f"Validation: {describe_validation(cfg, s.validation)}.\n"
              f"{describe_backbones(cfg, s)}\n\n")
    if failures:
        header += (f"**{len(failures)} run(s) failed** and are missing or cut short here: "
                   f"{', '.join(sorted(failures))}.\n\n")
    (out / "summary.md").write_text(header + summary, encoding="utf-8")
    return SimulationResult(out, rows, header + summary, plots, seconds, failures)


# --- the `medal simulate` command (its arguments are parsed in medal.cli) ---------------------
def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def command(cfg: Config, args: argparse.Namespace) -> int:
    """``medal simulate`` with the config already loaded (the CLI's COMMANDS signature)."""
    try:
        seeds = tuple(int(x) for x in _csv_list(args.seeds))
    except ValueError:
        raise SimulationError(f"--seeds expects integers like 0,1,2, got {args.seeds!r}") from None
    settings = SimulationSettings(
        truth=tuple(args.truth), out=args.out or cfg.workspace.with_name(
            cfg.workspace.name + "-simulation"),
        strategies=tuple(_csv_list(args.strategies)), seeds=seeds, rounds=args.rounds,
        budget=args.budget or cfg.query.budget, start=args.start, start_size=args.start_size,
        validation=args.validation, workers=args.workers, threads=args.threads,
        verbose=not args.quiet, backbones=args.backbones)
    r = simulate(cfg, settings)
    print(r.summary)
    print(f"results: {r.out / 'results.csv'}; curves: "
          f"{', '.join(p.name for p in r.plots) or 'none'}; summary: {r.out / 'summary.md'}")
    print(f"simulation finished in {r.seconds:.0f} s")
    if r.failures:
        print(f"{len(r.failures)} run(s) failed: {', '.join(sorted(r.failures))}",
              file=sys.stderr)
        return 1
    return 0
